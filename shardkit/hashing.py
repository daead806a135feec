"""SHA-256 of whole files or byte ranges, several at once on threads, in large reads.

hashlib (OpenSSL, SHA-NI where the CPU has it) releases the GIL while it hashes a buffer, and ``readinto``
releases it while it reads, so plain threads scale with cores: files are hashed in parallel, and within one file
the next piece is read while the current one is hashed (two buffers, one reader thread). Memory is bounded:
``2 * piece`` bytes per file in flight, whatever the file size.

The digests are those of ``sha256sum`` and of the Hub's LFS object ids (``lfs.oid`` in a tree listing; a Hugging
Face cache names its blobs by them). Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

from .fileio import read_exact, read_into

#: Bytes per read: large enough that per-call overhead vanishes, small enough to keep two per file in cache.
PIECE = 8 * 1024 * 1024
#: Files hashed at once by default (more threads than cores only adds contention).
MAX_WORKERS = 8

#: Called with the number of bytes just hashed (from worker threads; keep it cheap and thread-safe).
Progress = Callable[[int], object]


def default_workers() -> int:
    """One thread per core, at most :data:`MAX_WORKERS` (``os.sched_getaffinity`` respects CPU limits)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


def sha256_file(
    path: str | os.PathLike,
    *,
    start: int = 0,
    length: int | None = None,
    piece: int = PIECE,
    progress: Progress | None = None,
) -> str:
    """Hex SHA-256 of the bytes ``[start, start + length)`` of ``path`` (the whole file from ``start`` by default).

    Reads ``piece`` bytes at a time (positional reads), the next piece on a helper thread while this one is hashed.
    Raises ``OSError`` from the file system as is, and :class:`~shardkit.errors.CheckpointError` ``short-read`` when
    the file ends before ``start + length`` (a file that shrank while being hashed).
    """
    digest = hashlib.sha256()
    name = os.fspath(path)
    fd = os.open(name, os.O_RDONLY)
    try:
        if length is None:
            length = max(0, os.fstat(fd).st_size - start)
        if length <= piece:  # small files: no thread, no second buffer
            data = read_exact(fd, length, start, name)
            digest.update(data)
            if progress is not None and length:
                progress(length)
            return digest.hexdigest()

        buffers = [bytearray(piece), bytearray(piece)]

        def fill(buffer: bytearray, at: int, want: int) -> memoryview:
            view = memoryview(buffer)[:want]
            read_into(fd, view, at, name)
            return view

        position, remaining = start, length
        with ThreadPoolExecutor(1, thread_name_prefix="sha256-read") as reader:
            pending = reader.submit(fill, buffers[0], position, min(piece, remaining))
            turn = 0
            while remaining:
                view = pending.result()
                remaining -= len(view)
                position += len(view)
                turn ^= 1
                if remaining:
                    pending = reader.submit(fill, buffers[turn], position, min(piece, remaining))
                digest.update(view)
                if progress is not None:
                    progress(len(view))
    finally:
        os.close(fd)
    return digest.hexdigest()


def sha256_files(
    paths: Iterable[str | os.PathLike],
    *,
    workers: int | None = None,
    progress: Progress | None = None,
) -> dict[str, str]:
    """``{path: hex SHA-256}`` of every file, ``workers`` files at a time (default: one per core, up to 8).

    The result keeps the order of ``paths`` (as ``os.fspath`` strings). The first error raised by any file is
    raised here, after the other workers stopped taking new files.
    """
    names = [os.fspath(p) for p in paths]
    return dict(zip(names, map_threads(lambda p: sha256_file(p, progress=progress), names, workers=workers)))


def sha256_files_progress(paths: Sequence[str | os.PathLike], *, progress: bool, desc: str = "hashing") -> dict[str, str]:
    """:func:`sha256_files` with a bar over the total bytes (:func:`shardkit.progress.byte_bar`: decimal units, on a
    terminal only) when ``progress`` is true."""
    from .progress import byte_bar, threadsafe_update

    bar = byte_bar(sum(os.path.getsize(p) for p in paths), enabled=progress and bool(paths), desc=desc)
    try:
        return sha256_files(paths, progress=threadsafe_update(bar))
    finally:
        if bar is not None:
            bar.close()


def sha256_ranges(
    path: str | os.PathLike,
    ranges: Sequence[tuple[int, int]],
    *,
    workers: int | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Hex SHA-256 of each ``(start, length)`` byte range of one file, ranges hashed in parallel."""
    return map_threads(lambda r: sha256_file(path, start=r[0], length=r[1], progress=progress), list(ranges), workers=workers)


def map_threads(function, items: Sequence, *, workers: int | None = None) -> list:
    """``[function(item) for item in items]`` on up to ``workers`` threads; the first exception propagates."""
    count = min(len(items), workers or default_workers())
    if count <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(count, thread_name_prefix="sha256") as pool:
        futures = [pool.submit(function, item) for item in items]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise
