"""Exact reads and writes at explicit offsets, for both the read side and the write side.

Everything here works on raw file descriptors with ``pread``/``pwrite`` semantics, so no caller depends on a
file position and several threads may share one descriptor. A file that ends before the bytes its header
declares is always reported the same way: :func:`short_read`, a :class:`~shardkit.errors.CheckpointError` with
code ``short-read`` (or the caller's more specific code) naming the file, the offset and the bytes missing.
"""

from __future__ import annotations

import os
from typing import Any, TypeGuard

from .errors import CheckpointError


def is_count(value: object, limit: int | None = None) -> TypeGuard[int]:
    """A non-negative ``int`` (``bool`` excluded), below ``limit`` when given: what sizes, offsets and strides must be."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0 and (limit is None or value < limit)


def short_read(path: str, offset: int, missing: int, *, code: str = "short-read") -> CheckpointError:
    """The one error for a file that ends ``missing`` bytes before the data it declares, at ``offset``."""
    return CheckpointError(
        path,
        f"file ends at byte {offset}, {missing} bytes short of the data it declares (truncated since opened?)",
        code=code,
    )


def read_into(fd: int, dest: Any, offset: int, path: str, *, code: str = "short-read") -> None:
    """Fill ``dest`` (any writable buffer) with the bytes of ``fd`` at ``offset``; raise :func:`short_read` if the file
    ends first. Short reads from the kernel are retried, so the buffer is always filled completely or not at all."""
    view = memoryview(dest).cast("B")
    done, size = 0, len(view)
    while done < size:
        count = os.preadv(fd, [view[done:]], offset + done)
        if count <= 0:
            raise short_read(path, offset + done, size - done, code=code)
        done += count


def read_exact(fd: int, count: int, offset: int, path: str) -> bytearray:
    """A new buffer holding the ``count`` bytes of ``fd`` at ``offset`` (see :func:`read_into`)."""
    buffer = bytearray(count)
    read_into(fd, buffer, offset, path)
    return buffer


def write_all(fd: int, data: Any, offset: int) -> None:
    """``pwrite`` all of ``data`` (any buffer) at ``offset``: a short write is continued, a failing one raises
    :class:`OSError` (``ENOSPC``, ``EFBIG``) for the caller to turn into its own error."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


__all__ = ["is_count", "short_read", "read_into", "read_exact", "write_all"]
