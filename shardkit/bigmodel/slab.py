"""Slabs: one contiguous byte buffer per block, its tensors laid out as aligned views.

A block's CPU-tier weights live in one (pinned) host slab, so moving the block to the GPU is one coalesced copy
into a staging slab with the same layout; its parameters are views into whichever slab holds it.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Byte alignment of every tensor inside a slab (what GPU kernels like best for vectorized loads).
ALIGN = 256


@dataclass(frozen=True, slots=True)
class Slot:
    """Where tensor ``name`` sits in its block's slab."""

    name: str
    offset: int
    nbytes: int
    dtype: object  # torch.dtype
    shape: tuple[int, ...]


def layout(specs: list[tuple[str, object, tuple[int, ...]]]) -> tuple[dict[str, Slot], int]:
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


def view(buffer, slot: Slot):
    """The tensor ``slot`` describes inside the uint8 tensor ``buffer``."""
    return buffer[slot.offset : slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)


def allocate(nbytes: int, device="cpu", pin: bool = False):
    """An uninitialized uint8 buffer of ``nbytes`` (at least one byte), page-locked when ``pin`` and on the CPU."""
    import torch

    return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device, pin_memory=pin and torch.device(device).type == "cpu")


def as_bytes(tensor):
    """A contiguous tensor's memory as a flat uint8 tensor (a view, no copy)."""
    import torch

    flat = tensor.reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat
