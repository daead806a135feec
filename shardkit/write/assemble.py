"""Assemble a chunked tensor's bytes in C order without torch, through a bounded buffer.

A tensor saved in blocks along dimension 0 (FSDP's ``Shard(0)``) is already a list of byte ranges
(:attr:`~shardkit.table.TensorEntry.ranges`) and is copied file to file. Every other layout (``Shard(1)`` for
tensor parallelism, 2-D meshes, chunks in any order) is assembled here band by band: a band is a run of whole
dimension-0 rows of the global tensor; for each chunk crossing it, the chunk's part of those rows (contiguous in
the chunk) is read with ``preadv`` straight into the band, one destination slice per contiguous run, so the
kernel does the strided copy. Memory is one band of about :data:`BAND_SIZE` bytes, or one row of the global
tensor when a row is larger.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator

from ..dtypes import DTYPE_BITS
from ..fileio import read_into
from ..table import TensorEntry

#: Bytes of the global tensor assembled at a time.
BAND_SIZE = 8 * 1024 * 1024


def can_assemble(entry: TensorEntry) -> bool:
    """Whether ``entry`` is a chunked tensor whose chunks are each one contiguous byte run (needed here)."""
    return bool(entry.chunks) and entry.offset is None and all(c.entry.offset is not None or not c.numel for c in entry.chunks)


class Bands:
    """Band buffers kept from one tensor to the next: allocating and zeroing them per tensor is slow (figures in
    docs/performance.md, "Measured design choices")."""

    def __init__(self, count: int = 1) -> None:
        self.buffers = [bytearray() for _ in range(count)]

    def get(self, size: int) -> list[bytearray]:
        for index, buffer in enumerate(self.buffers):
            if len(buffer) < size:
                self.buffers[index] = bytearray(size)
        return self.buffers


def assembled(
    entry: TensorEntry, fd_of: Callable[[str], int], band_size: int = BAND_SIZE, bands: Bands | None = None
) -> Iterator[memoryview]:
    """Yield the bytes of the chunked tensor ``entry`` in C order, in consecutive pieces of whole dim-0 rows.

    ``fd_of(path)`` gives a readable descriptor of a chunk's file. Pieces rotate through the buffers of ``bands``
    (one by default): a piece stays valid until as many more are asked for (two let a writer thread write one
    while the next is assembled). Requires :func:`can_assemble`; the chunks must tile the tensor (the reader
    checks it).
    """
    shape = entry.shape
    bits = DTYPE_BITS[entry.dtype]
    if bits % 8:
        raise ValueError(f"{entry.name}: sub-byte dtype {entry.dtype} cannot be assembled by rows")
    item = bits // 8
    row = math.prod(shape[1:]) * item  # bytes of one dim-0 row of the global tensor
    if not entry.nbytes:
        return
    rows_per_band = max(1, band_size // row)
    chunks = [c for c in entry.chunks if c.numel]
    buffers = (bands or Bands()).get(min(rows_per_band, shape[0]) * row)
    strides = _strides(shape, item)
    for number, r0 in enumerate(range(0, shape[0], rows_per_band)):
        r1 = min(shape[0], r0 + rows_per_band)
        view = memoryview(buffers[number % len(buffers)])[: (r1 - r0) * row]
        for chunk in chunks:
            c0, c1 = chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0]
            a, b = max(r0, c0), min(r1, c1)
            if a >= b:
                continue
            chunk_row = math.prod(chunk.sizes[1:]) * item
            source = chunk.entry
            assert source.offset is not None  # a chunk is one contiguous byte range (can_assemble)
            targets, run = _targets(view, chunk.offsets, chunk.sizes, shape, strides, a - r0, b - a)
            _read_scattered(fd_of(source.file), targets, run, source.offset + (a - c0) * chunk_row, source.file)
        yield view


def _strides(shape: tuple[int, ...], item: int) -> tuple[int, ...]:
    strides, step = [], item
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def _targets(band: memoryview, offsets, sizes, shape, strides, band_row: int, rows: int) -> tuple[list[memoryview], int]:
    """Where ``rows`` dim-0 rows of a chunk go in ``band`` (whose first row is global row ``band_row``): one slice
    per contiguous run, in the chunk's C order, and the runs' length.

    A run spans the trailing dimensions the chunk covers fully, times its extent in the last one it does not;
    the dimensions before that are iterated.
    """
    ndim = len(shape)
    split = ndim - 1  # the last dim (>= 1) where the chunk is narrower than the tensor
    while split > 1 and sizes[split] == shape[split]:
        split -= 1
    if ndim == 1 or (split == 1 and sizes[1] == shape[1]):  # whole rows: one run
        start, run = band_row * strides[0], rows * strides[0]
        return [band[start : start + run]], run
    run = sizes[split] * strides[split]
    base = band_row * strides[0] + sum(offsets[d] * strides[d] for d in range(1, split + 1))
    if split == 1:  # the common 2-D-like case: one run per row
        return [band[dst : dst + run] for dst in range(base, base + rows * strides[0], strides[0])], run
    outer, outer_strides = sizes[1:split], strides[1:split]
    targets = [
        band[dst : dst + run]
        for r in range(rows)
        for dst in (base + r * strides[0] + sum(i * s for i, s in zip(index, outer_strides)) for index in _ndindex(outer))
    ]
    return targets, run


def _ndindex(sizes: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    if not sizes:
        yield ()
        return
    for first in range(sizes[0]):
        for rest in _ndindex(sizes[1:]):
            yield (first, *rest)


#: Most buffers one ``preadv`` call takes.
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 1024


def _read_scattered(fd: int, targets: list[memoryview], run: int, offset: int, path: str) -> None:
    """Fill ``targets`` (each ``run`` bytes) in order from the contiguous bytes at ``offset``: batches of ``preadv``,
    any short read finished buffer by buffer (:func:`~shardkit.fileio.short_read` if the file ends)."""
    for first in range(0, len(targets), _IOV_MAX):
        batch = targets[first : first + _IOV_MAX]
        got = os.preadv(fd, batch, offset)
        if got < run * len(batch):  # rare: finish by hand
            done, partial = divmod(got, run)
            for index in range(done, len(batch)):
                read_into(fd, batch[index][partial:], offset + index * run + partial, path)
                partial = 0
        offset += run * len(batch)
