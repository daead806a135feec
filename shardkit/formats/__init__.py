"""Checkpoint file formats: tell them apart by their first bytes and read each one's header.

:func:`open_file` is the single entry point: it returns a file's :class:`~shardkit.table.FileInfo` and tensor
entries, or raises a :class:`~shardkit.errors.CheckpointError` naming the file and the problem.
"""

from __future__ import annotations

import os

from ..errors import CheckpointError, NotACheckpointError
from ..naming import TORCH_SUFFIXES
from ..table import FileInfo, TensorEntry
from .legacy import LEGACY_MAGIC, read_legacy
from .safetensors import read_safetensors
from .torchzip import read_torch_zip


def sniff(path: str, head: bytes) -> str:
    """The format of a file from its first bytes: ``safetensors``, ``torch-zip`` or ``torch-legacy``.

    Raises :class:`NotACheckpointError` for Git LFS pointers, HTML pages and (for torch suffixes) anything
    that is neither a zip nor a legacy torch pickle.
    """
    if head.startswith(b"version https://git-lfs"):
        raise NotACheckpointError(
            path, "is a Git LFS pointer, not the file it points to: run `git lfs pull` or download it again", code="lfs-pointer"
        )
    lowered = head.lstrip().lower()
    if lowered.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        raise NotACheckpointError(path, "is an HTML/XML page (an error page saved by a failed download?)", code="html-page")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "torch-zip"
    if head.startswith(LEGACY_MAGIC):
        return "torch-legacy"
    if len(head) > 262 and head[257:262] == b"ustar":
        raise NotACheckpointError(
            path, "is a tar archive (torch's pre-1.4 format), which shardkit does not read", code="unsupported-format"
        )
    if path.endswith(TORCH_SUFFIXES):
        raise NotACheckpointError(path, "is neither a torch zip archive nor a legacy torch file", code="unknown-format")
    return "safetensors"


def open_file(path: str | os.PathLike) -> tuple[FileInfo, list[TensorEntry]]:
    """Read one checkpoint file's header (never its tensor data, except for legacy torch files)."""
    path = os.fspath(path)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError(path, "no such file", code="missing-file") from None
    except IsADirectoryError:
        raise CheckpointError(path, "is a folder, expected a checkpoint file", code="not-a-file") from None
    except OSError as exc:
        raise CheckpointError(path, f"cannot be opened ({exc.strerror})", code="unreadable") from None
    with handle:
        fmt = sniff(path, handle.read(512))
        if fmt == "torch-zip":
            return read_torch_zip(path, handle)
        if fmt == "torch-legacy":
            return read_legacy(path)
        return read_safetensors(path, handle)


__all__ = ["open_file", "sniff", "TORCH_SUFFIXES"]
