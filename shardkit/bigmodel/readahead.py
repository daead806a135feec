"""Read byte ranges in large chunks on background threads, into a small ring of reusable (pinned) buffers.

The consumer gets each chunk (in any order), enqueues what it does with it (a host->GPU copy, a cast, a write)
and hands the buffer back with the CUDA event that marks the end of that work; a reader waits on that event,
on its own thread, before refilling the buffer. Host memory is ``depth * chunk`` bytes whatever the
checkpoint's size; several threads keep several reads in flight, which page-cache and NVMe reads need to
reach their bandwidth.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass

from ..fileio import read_into

CHUNK = 64 * 2**20
DEPTH = 3
THREADS = 1

#: Parallel reads (the loader's GPU ring and its direct reads into CPU-tier slabs, the disk tier's staging): pieces
#: of this size from this many threads: the fastest of the sizes and thread counts measured, warm and cold
#: (docs/performance.md, "Measured design choices").
PARALLEL_PIECE = 16 * 2**20
PARALLEL_THREADS = 8
#: Pinned buffers of the loader's GPU ring and of the disk tier's ring: two per thread, so each thread reads into
#: one while the copy out of its other one runs.
PARALLEL_DEPTH = 2 * PARALLEL_THREADS


def disk_ring(largest: int) -> tuple[int, int]:
    """``(piece bytes, count)`` of the pinned ring a GPU-run disk tier streams blocks of at most ``largest`` bytes
    through (disk -> ring piece -> GPU slab): :data:`PARALLEL_PIECE` pieces, :data:`PARALLEL_DEPTH` of them, never
    more than two blocks' worth. Its size is fixed, whatever the blocks: 256 MiB for blocks of 128 MiB and more."""
    piece = max(256, min(PARALLEL_PIECE, -(-largest // 256) * 256))
    return piece, max(2, min(PARALLEL_DEPTH, -(-2 * largest // piece)))


def split_pieces(runs: list, nbytes: int, piece: int) -> list[tuple[int, int, list]]:
    """Cut a slab of ``nbytes`` filled by ``runs`` (``(file, file offset, slab offset, nbytes)``) into spans of at
    most ``piece`` bytes: ``(slab offset, span bytes, [(file, file offset, offset in the span, nbytes)])``. A span
    is copied whole (alignment padding included), so many small tensors travel as one copy."""
    spans = []
    for start in range(0, nbytes, piece):
        end = min(start + piece, nbytes)
        reads = []
        for path, offset, at, size in runs:
            low, high = max(at, start), min(at + size, end)
            if low < high:
                reads.append((path, offset + low - at, low - start, high - low))
        if reads:
            last = max(at + size for _, _, at, size in reads)
            spans.append((start, last, reads))
    return spans


@dataclass(slots=True)
class Chunk:
    job: int  # index into the jobs list
    start: int  # byte offset of this chunk inside the job's range
    nbytes: int
    slot: int  # which ring buffer
    data: object  # uint8 tensor view of the ring buffer holding the bytes


class ReadAhead:
    """Iterate ``Chunk`` objects over ``jobs`` = ``[(path, offset, nbytes)]``; call :meth:`release` on each one."""

    def __init__(
        self,
        jobs: list[tuple[str, int, int]],
        *,
        chunk: int = CHUNK,
        depth: int = DEPTH,
        threads: int = THREADS,
        pin: bool = False,
        align: int = 8,
    ) -> None:
        from .slab import allocate

        largest = max((n for _, _, n in jobs), default=0)
        self.chunk = max(align, min(chunk, largest) // align * align) if largest else align
        self.pieces = [(i, start) for i, (_, _, n) in enumerate(jobs) for start in range(0, n, self.chunk)]
        self.jobs = jobs
        threads = max(1, min(threads, len(self.pieces)))
        depth = max(depth, threads)
        count = depth if self.pieces else 0
        ring = allocate(self.chunk * count, pin=pin)  # one mapping, registered once: each registration costs milliseconds
        self.buffers = [ring[i * self.chunk : (i + 1) * self.chunk] for i in range(count)]
        self._free: queue.Queue = queue.Queue()
        for slot in range(len(self.buffers)):
            self._free.put((slot, None))
        self._ready: queue.Queue = queue.Queue()
        self._next = iter(self.pieces)
        self._lock = threading.Lock()
        self._stop = False
        self._fds: dict[str, int] = {}
        self._threads = [threading.Thread(target=self._run, name="shardkit-readahead", daemon=True) for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            return fd

    def _run(self) -> None:
        try:
            while True:
                with self._lock:
                    piece = next(self._next, None)
                if piece is None or self._stop:
                    return
                index, start = piece
                path, offset, nbytes = self.jobs[index]
                slot, event = self._free.get()
                if self._stop:
                    return
                if event is not None:
                    event.synchronize()  # the previous copy out of this buffer has finished
                size = min(self.chunk, nbytes - start)
                view = memoryview(self.buffers[slot].numpy())[:size]
                read_into(self._fd(path), view, offset + start, path)
                self._ready.put(Chunk(index, start, size, slot, self.buffers[slot][:size]))
        except BaseException as exc:  # hand it to the consumer
            self._ready.put(exc)
        finally:
            self._ready.put(None)

    def __iter__(self):
        finished = 0
        while finished < len(self._threads):
            item = self._ready.get()
            if item is None:
                finished += 1
                continue
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, chunk: Chunk, event=None) -> None:
        """Give ``chunk``'s buffer back; ``event`` (a CUDA event) marks when the work reading it is done."""
        self._free.put((chunk.slot, event))

    def close(self) -> None:
        self._stop = True
        for _ in self._threads:
            self._free.put((0, None))
        for thread in self._threads:
            thread.join()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def read_direct(reads: list, piece: int = PARALLEL_PIECE, threads: int = PARALLEL_THREADS) -> None:
    """Read each entry's bytes straight into its destination (a uint8 CPU tensor), in pieces, from several threads."""
    import concurrent.futures

    pieces = []
    for entry, dest in reads:
        view = memoryview(dest.numpy())
        pieces += [(entry, start, view[start : start + piece]) for start in range(0, entry.nbytes, piece)]
    if not pieces:
        return
    fds: dict[str, int] = {}
    for entry, _, _ in pieces:
        if entry.file not in fds:
            fds[entry.file] = os.open(entry.file, os.O_RDONLY)

    def read(item):
        entry, start, view = item
        read_into(fds[entry.file], view, entry.offset + start, entry.file)

    try:
        with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="shardkit-read") as pool:
            list(pool.map(read, pieces))
    finally:
        for fd in fds.values():
            os.close(fd)
