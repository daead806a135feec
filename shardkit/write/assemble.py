"""Assemble a chunked tensor's bytes in C order without torch, through a bounded buffer.

A tensor saved in blocks along dimension 0 (FSDP's ``Shard(0)``) is already a list of byte ranges
(:attr:`~shardkit.table.TensorEntry.ranges`) and is copied file to file. Every other layout (``Shard(1)`` for
tensor parallelism, 2-D meshes, chunks in any order) is assembled here band by band: a band is a run of whole
dimension-0 rows of the global tensor; for each chunk crossing it, the chunk's part of those rows is read in one
``pread`` (it is contiguous in the chunk) and its rows are scattered into the band with strided copies. Memory is
two band buffers of about :data:`BAND_SIZE` bytes, or two rows of the global tensor when one row is larger.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from ..dtypes import DTYPE_BITS
from ..fileio import read_into
from ..table import TensorEntry

#: Bytes of the global tensor assembled at a time.
BAND_SIZE = 8 * 1024 * 1024


def can_assemble(entry: TensorEntry) -> bool:
    """Whether ``entry`` is a chunked tensor whose chunks are each one contiguous byte run (needed here)."""
    return bool(entry.chunks) and entry.offset is None and all(c.entry.offset is not None or not c.numel for c in entry.chunks)


def assembled(entry: TensorEntry, fd_of: Callable[[str], int], band_size: int = BAND_SIZE) -> Iterator[memoryview]:
    """Yield the bytes of the chunked tensor ``entry`` in C order, in consecutive pieces of whole dim-0 rows.

    ``fd_of(path)`` gives a readable descriptor of a chunk's file. Each piece is valid until the next is asked
    for. Requires :func:`can_assemble`; the chunks must tile the tensor (the reader checks it).
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
    band = bytearray(min(rows_per_band, shape[0]) * row)
    scratch = bytearray(len(band))
    strides = _strides(shape, item)
    for r0 in range(0, shape[0], rows_per_band):
        r1 = min(shape[0], r0 + rows_per_band)
        view = memoryview(band)[: (r1 - r0) * row]
        for chunk in chunks:
            c0, c1 = chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0]
            a, b = max(r0, c0), min(r1, c1)
            if a >= b:
                continue
            chunk_row = math.prod(chunk.sizes[1:]) * item
            count = (b - a) * chunk_row
            data = memoryview(scratch)[:count]
            source = chunk.entry
            read_into(fd_of(source.file), data, source.offset + (a - c0) * chunk_row, source.file)
            _scatter(view, data, chunk.offsets, chunk.sizes, shape, strides, a - r0, b - a)
        yield view


def _strides(shape: tuple[int, ...], item: int) -> tuple[int, ...]:
    strides, step = [], item
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def _scatter(band, data, offsets, sizes, shape, strides, band_row: int, rows: int) -> None:
    """Copy ``rows`` dim-0 rows of a chunk (``data``, C order) into ``band`` whose first row is global row ``band_row``.

    The chunk's contiguous runs: trailing dimensions it covers fully, times its extent in the last one it does
    not. Everything before that is iterated.
    """
    ndim = len(shape)
    split = ndim - 1  # the last dim (>= 1) where the chunk is narrower than the tensor; its run spans sizes[split:]
    while split > 1 and sizes[split] == shape[split]:
        split -= 1
    if ndim == 1 or (split == 1 and sizes[1] == shape[1]):
        # Whole rows: one copy.
        start = band_row * strides[0]
        band[start : start + len(data)] = data
        return
    run = sizes[split] * strides[split]
    base = band_row * strides[0] + sum(offsets[d] * strides[d] for d in range(1, split + 1))
    src = 0
    if split == 1:  # the common 2-D-like case: one run per row
        for dst in range(base, base + rows * strides[0], strides[0]):
            band[dst : dst + run] = data[src : src + run]
            src += run
        return
    outer, outer_strides = sizes[1:split], strides[1:split]
    for r in range(rows):
        row_base = base + r * strides[0]
        for index in _ndindex(outer):
            dst = row_base + sum(i * s for i, s in zip(index, outer_strides))
            band[dst : dst + run] = data[src : src + run]
            src += run


def _ndindex(sizes: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    if not sizes:
        yield ()
        return
    for first in range(sizes[0]):
        for rest in _ndindex(sizes[1:]):
            yield (first, *rest)
