"""Move byte ranges between files without holding them: ``copy_file_range``, else ``sendfile``, else a buffer.

Every function works on raw file descriptors at explicit offsets (``pread``/``pwrite`` semantics), so callers
never depend on a file position. Memory used is at most one :data:`BUFFER_SIZE` buffer.

The kernel copies page by page: when source and destination offsets sit at different places within a page,
every source page lands across two destination pages and an in-kernel copy (and the writeback after it) runs
far slower than ``cp`` (docs/performance.md, "Measured design choices"). Such ranges go through a small, cache-sized user-space
buffer instead, which is as fast as ``cp``; ranges whose offsets agree modulo the page size use
``copy_file_range``.
"""

from __future__ import annotations

import errno
import os
import zlib
from typing import overload

from ..fileio import read_exact, read_into, short_read, write_all

#: The one buffer used when bytes must pass through user space (fallback copies, CRC, verification). Small
#: enough to stay in the CPU cache between the read and the write: larger buffers are slower.
BUFFER_SIZE = 2 * 1024 * 1024

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

#: errno values meaning "this kernel/filesystem pair can't do that call": fall back to the next method.
_UNSUPPORTED = {errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.ESPIPE}

_methods = {"copy_file_range": hasattr(os, "copy_file_range"), "sendfile": hasattr(os, "sendfile")}


def copy_range(src: int, src_offset: int, dst: int, dst_offset: int, count: int, src_path: str) -> None:
    """Copy ``count`` bytes from ``src`` at ``src_offset`` to ``dst`` at ``dst_offset``.

    Tries ``os.copy_file_range`` (in-kernel, may share extents), then ``os.sendfile``, then a buffered copy;
    offsets that disagree within a page go straight to the buffered copy (see the module docstring).
    Raises :class:`CheckpointError` (``short-read``) if the source ends early; write errors (``ENOSPC``,
    ``EFBIG``) propagate as :class:`OSError`.
    """
    done = 0
    if (src_offset - dst_offset) % PAGE_SIZE and count > PAGE_SIZE:
        copy_buffered(src, src_offset, dst, dst_offset, count, src_path)
        return
    for name, call in _KERNEL_COPIES.items():
        if not _methods[name]:
            continue
        try:
            while done < count:
                moved = call(src, dst, count - done, src_offset + done, dst_offset + done)
                if moved == 0:
                    raise short_read(src_path, src_offset + done, count - done)
                done += moved
            return
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            _methods[name] = False  # this kernel/filesystem can't: don't try it again
    copy_buffered(src, src_offset + done, dst, dst_offset + done, count - done, src_path)


def _sendfile(src: int, dst: int, count: int, src_offset: int, dst_offset: int) -> int:
    os.lseek(dst, dst_offset, os.SEEK_SET)  # sendfile writes at the destination's file position
    return os.sendfile(dst, src, src_offset, count)


#: In-kernel copies, tried in this order: ``(src, dst, count, src_offset, dst_offset) -> bytes moved``.
_KERNEL_COPIES = {
    "copy_file_range": lambda src, dst, count, src_offset, dst_offset: os.copy_file_range(
        src, dst, count, src_offset, dst_offset
    ),
    "sendfile": _sendfile,
}


@overload
def copy_buffered(src: int, src_offset: int, dst: int, dst_offset: int, count: int, src_path: str, crc: int) -> int: ...


@overload
def copy_buffered(src: int, src_offset: int, dst: int, dst_offset: int, count: int, src_path: str, crc: None = None) -> None: ...


def copy_buffered(
    src: int, src_offset: int, dst: int, dst_offset: int, count: int, src_path: str, crc: int | None = None
) -> int | None:
    """Copy through one user-space buffer; with ``crc`` given, return the CRC-32 of the bytes continued from it."""
    buffer = bytearray(min(BUFFER_SIZE, count) or 1)
    view = memoryview(buffer)
    done = 0
    while done < count:
        chunk = view[: min(len(buffer), count - done)]
        read_into(src, chunk, src_offset + done, src_path)
        if crc is not None:
            crc = zlib.crc32(chunk, crc)
        write_all(dst, chunk, dst_offset + done)
        done += len(chunk)
    return crc


class Writeback:
    """Starts the kernel's writeback of an output file every :data:`STEP` bytes instead of leaving it all to the
    final fsync, so that copying and writing to disk overlap (docs/performance.md, "Measured design choices")."""

    STEP = 64 * 1024 * 1024

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.started = 0

    def advance(self, position: int) -> None:
        """Everything before ``position`` has been written."""
        if position - self.started >= self.STEP and hasattr(os, "posix_fadvise"):
            # DONTNEED starts asynchronous writeback of dirty pages (and drops only pages already clean).
            os.posix_fadvise(self.fd, self.started, position - self.started, os.POSIX_FADV_DONTNEED)
            self.started = position


def same_bytes(a: int, a_offset: int, b: int, b_offset: int, count: int, a_path: str, b_path: str) -> bool:
    """Whether ``count`` bytes at ``a_offset`` in ``a`` equal those at ``b_offset`` in ``b`` (one chunk of each at a time)."""
    done = 0
    while done < count:
        want = min(BUFFER_SIZE, count - done)
        left = read_exact(a, want, a_offset + done, a_path)
        right = read_exact(b, want, b_offset + done, b_path)
        if left != right:
            return False
        done += want
    return True


__all__ = ["BUFFER_SIZE", "PAGE_SIZE", "Writeback", "copy_buffered", "copy_range", "same_bytes", "short_read", "write_all"]
