"""The model's other files (config, tokenizer, README…): which they are, and copying them beside the new checkpoint.

``split`` and ``convert`` of a folder or a Hub repo put these files into DST by default, so that
``from_pretrained(DST)`` works; ``weights_only`` turns it off. This module is the one place that decides what
"other files" are and copies them: a step that rewrites one (e.g. a config's dtype after a cast) does it here,
on the staged copy, replacing the file (never writing through a hard link into the source).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..naming import INDEX_RE
from .staging import link_or_copy

#: Weights of any format: never copied (the new checkpoint replaces the source's; other formats' weights,
#: optimizer and scheduler states and training pickles would describe something else or waste space).
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".onnx_data",
    ".gguf",
    ".ggml",
    ".pkl",
    ".pickle",
    ".npz",
    ".npy",
    ".tflite",
    ".mlmodel",
    ".ot",
)


def is_other_file(name: str) -> bool:
    """True for a file (relative name, ``/``-separated) to carry beside a checkpoint: not hidden, not weights, not
    an index."""
    parts = name.split("/")
    if any(part.startswith(".") for part in parts):  # .gitattributes, .cache/, .git/, our temporary folders
        return False
    base = parts[-1]
    return not (base.lower().endswith(WEIGHT_SUFFIXES) or INDEX_RE.match(base))


def find_other_files(folder: str | os.PathLike) -> list[str]:
    """The other files under ``folder`` (subfolders included), as sorted ``/``-separated relative names."""
    root = Path(folder)
    found = []
    for directory, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        base = Path(directory).relative_to(root)
        for name in files:
            relative = (base / name).as_posix()
            if is_other_file(relative) and os.path.isfile(os.path.join(directory, name)):
                found.append(relative)
    return sorted(found)


def source_folder(source: str | os.PathLike) -> str | None:
    """The folder whose other files go with a checkpoint read from ``source``: the folder itself, or an index's
    folder; None for a single checkpoint file (it has no folder of its own)."""
    path = os.fspath(source)
    if os.path.isdir(path):
        return path
    if path.endswith(".json") and os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    return None


def copy_other_files(folder: str | os.PathLike, target: str | os.PathLike, names: list[str]) -> None:
    """Put ``names`` (from :func:`find_other_files`) from ``folder`` into ``target``: hard links where the file
    system allows (a Hugging Face cache's symlinks are followed to their blobs), copies otherwise."""
    for name in names:
        destination = Path(target, name)
        destination.parent.mkdir(parents=True, exist_ok=True)
        source = os.path.realpath(os.path.join(folder, name))
        try:
            link_or_copy(source, destination)
        except OSError:
            shutil.copyfile(source, destination)
