"""Slabs: one contiguous byte buffer per block, its tensors laid out as aligned views.

A block's CPU-tier weights live in one (pinned) host slab, so moving the block to the GPU is one coalesced copy
into a staging slab with the same layout; its parameters are views into whichever slab holds it.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import mmap
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the planner imports this module without torch
    import torch

#: Byte alignment of every tensor inside a slab (what GPU kernels like best for vectorized loads).
ALIGN = 256


@dataclass(frozen=True, slots=True)
class Slot:
    """Where tensor ``name`` sits in its block's slab."""

    name: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def layout(specs: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[dict[str, Slot], int]:
    """Lay ``(name, torch dtype, shape)`` out back to back at :data:`ALIGN`-byte offsets; returns slots and total bytes."""
    slots, position = {}, 0
    for name, dtype, shape in specs:
        numel = 1
        for dim in shape:
            numel *= dim
        nbytes = numel * dtype.itemsize
        slots[name] = Slot(name, position, nbytes, dtype, tuple(shape))
        position += -(-nbytes // ALIGN) * ALIGN
    return slots, position


def view(buffer: torch.Tensor, slot: Slot) -> torch.Tensor:
    """The tensor ``slot`` describes inside the uint8 tensor ``buffer``."""
    return buffer[slot.offset : slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)


def allocate(nbytes: int, device: str | torch.device = "cpu", pin: bool = False) -> torch.Tensor:
    """An uninitialized uint8 buffer of ``nbytes`` (at least one byte), page-locked when ``pin`` and on the CPU."""
    import torch

    if pin and torch.device(device).type == "cpu" and torch.cuda.is_available():
        return _pinned(max(nbytes, 1))
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)


def _pinned(nbytes: int) -> torch.Tensor:
    """Page-locked host memory of exactly ``nbytes`` (whole pages).

    torch's pinned allocator rounds every request up to a power of two (a 404 MB decoder layer takes 512 MiB, a
    7 GB CPU tier 8.9 GB) and keeps freed blocks cached; an anonymous mapping registered with CUDA costs only
    its own pages, and goes back to the system (unregistered first) when the last tensor viewing it is freed.
    Its pages are huge pages where the kernel allows, faulted in from several threads before registering:
    on an H200 host that made 3.4 GB of pinned memory take 0.44 s, against 1.38 s when ``cudaHostRegister``
    faulted fresh 4 KiB pages itself. A private mapping is left out of forked children (as RDMA registrations
    are), so a fork neither copies it nor makes the parent's pages copy-on-write under the GPU's DMA.
    """
    import torch

    private = getattr(mmap, "MAP_PRIVATE", None)
    region = _PinnedRegion(-1, nbytes, flags=private | mmap.MAP_ANONYMOUS) if private is not None else _PinnedRegion(-1, nbytes)
    for advice in ("MADV_DONTFORK", "MADV_HUGEPAGE") if private is not None else ():
        try:
            region.madvise(getattr(mmap, advice))
        except (AttributeError, OSError):  # an older kernel or platform: plain pages, inherited mapping
            pass
    tensor = torch.frombuffer(region, dtype=torch.uint8)
    populate(tensor.data_ptr(), nbytes)
    if int(torch.cuda.cudart().cudaHostRegister(tensor.data_ptr(), nbytes, 0)) != 0:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # registration refused: torch's allocator
    region.registered = tensor.data_ptr()
    region.unregister = torch.cuda.cudart().cudaHostUnregister  # bound now: __del__ may run at interpreter exit
    return tensor


#: Faulting fresh memory in: pieces of this size, from up to this many threads (page zeroing is per-core work).
POPULATE_PIECE = 32 * 2**20
POPULATE_THREADS = 8
_MADV_POPULATE_WRITE = 23  # Linux 5.14: fault pages in for writing, without writing them


def populate(address: int, nbytes: int) -> None:
    """Fault in the pages of ``[address, address + nbytes)`` (page-aligned, writable, fresh), in parallel.

    ``madvise(MADV_POPULATE_WRITE)`` where the kernel has it, else a zero fill; ctypes calls release the GIL, so
    the pieces fault on several cores at once. Where libc cannot be reached this does nothing (pages then fault
    on first use, as before).
    """
    libc = _libc()
    if libc is None or nbytes <= 0:
        return
    pieces = [(address + start, min(POPULATE_PIECE, nbytes - start)) for start in range(0, nbytes, POPULATE_PIECE)]

    def fault(piece: tuple[int, int]) -> None:
        start, size = piece
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(size), _MADV_POPULATE_WRITE) != 0:
            ctypes.memset(start, 0, size)  # older kernels: touching every page does the same, with one write more

    if len(pieces) == 1:
        fault(pieces[0])
        return
    with concurrent.futures.ThreadPoolExecutor(min(POPULATE_THREADS, len(pieces)), thread_name_prefix="shardkit-fault") as pool:
        list(pool.map(fault, pieces))


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):  # no dlopen(NULL) (Windows) or no madvise
        return None


class _PinnedRegion(mmap.mmap):
    """An anonymous mapping that unregisters itself from CUDA before it is unmapped (tensors keep it alive)."""

    registered: int | None = None
    unregister = None

    def __del__(self) -> None:
        if self.registered is not None and self.unregister is not None:
            self.unregister(self.registered)


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a flat uint8 tensor (a view, no copy)."""
    import torch

    flat = tensor.reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
