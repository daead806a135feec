"""Read byte ranges in large chunks on a background thread, into a small ring of reusable (pinned) buffers.

The consumer gets each chunk, enqueues what it does with it (a host->GPU copy, a cast, a write) and hands the
buffer back with the CUDA event that marks the end of that work; the reader waits on that event, on its own
thread, before refilling the buffer. Host memory is ``depth * chunk`` bytes whatever the checkpoint's size.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass

from ..errors import CheckpointError

CHUNK = 64 * 2**20
DEPTH = 3


@dataclass(slots=True)
class Chunk:
    job: int  # index into the jobs list
    start: int  # byte offset of this chunk inside the job's range
    nbytes: int
    slot: int  # which ring buffer
    data: object  # uint8 tensor view of the ring buffer holding the bytes


class ReadAhead:
    """Iterate ``Chunk`` objects over ``jobs`` = ``[(path, offset, nbytes)]``; call :meth:`release` on each one."""

    def __init__(self, jobs: list[tuple[str, int, int]], *, chunk: int = CHUNK, depth: int = DEPTH, pin: bool = False, align: int = 8) -> None:
        from .slab import allocate

        self.jobs = jobs
        largest = max((n for _, _, n in jobs), default=0)
        self.chunk = max(align, min(chunk, largest) // align * align) if largest else align
        self.buffers = [allocate(self.chunk, pin=pin) for _ in range(depth if jobs else 0)]
        self._free: queue.Queue = queue.Queue()
        for slot in range(len(self.buffers)):
            self._free.put((slot, None))
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="shardkit-readahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        fds: dict[str, int] = {}
        try:
            for index, (path, offset, nbytes) in enumerate(self.jobs):
                fd = fds.get(path)
                if fd is None:
                    fd = fds[path] = os.open(path, os.O_RDONLY)
                for start in range(0, nbytes, self.chunk):
                    slot, event = self._free.get()
                    if self._stop:
                        return
                    if event is not None:
                        event.synchronize()  # the previous copy out of this buffer has finished
                    size = min(self.chunk, nbytes - start)
                    view = memoryview(self.buffers[slot].numpy())[:size]
                    done = 0
                    while done < size:
                        count = os.preadv(fd, [view[done:]], offset + start + done)
                        if count <= 0:
                            raise CheckpointError(path, f"file ends {size - done} bytes short of the tensor data its header declares (truncated?)", code="short-read")
                        done += count
                    self._ready.put(Chunk(index, start, size, slot, self.buffers[slot][:size]))
            self._ready.put(None)
        except BaseException as exc:  # hand it to the consumer
            self._ready.put(exc)
        finally:
            for fd in fds.values():
                os.close(fd)

    def __iter__(self):
        while True:
            item = self._ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, chunk: Chunk, event=None) -> None:
        """Give ``chunk``'s buffer back; ``event`` (a CUDA event) marks when the work reading it is done."""
        self._free.put((chunk.slot, event))

    def close(self) -> None:
        self._stop = True
        for _ in self.buffers:
            self._free.put((0, None))
        while self._thread.is_alive():
            try:
                self._ready.get(timeout=0.05)
            except queue.Empty:
                pass
