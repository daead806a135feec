"""Output tensors that are not one source entry as it stands: byte pieces of other entries, or computed ones.

A transform (:mod:`shardkit.write.transforms`) describes each output tensor as a table entry. Most are plain
:class:`~shardkit.table.TensorEntry` objects under a new name, copied as they are. Two kinds are derived:

- :class:`PiecedEntry`: the concatenation of byte pieces of source entries (packing MoE experts into one 3-D
  tensor, or cutting one expert out of it). When every piece lies in a byte-addressable entry the writer copies
  the pieces range by range, never materializing; otherwise they are read whole and sliced.
- :class:`ComputedEntry`: values computed from source entries by a :class:`Recipe` (FP8 dequantization). The
  recipe yields the output bytes in chunks, so the writer and ``--verify`` hold one chunk, not the tensor.

Both have ``offset=None``: nothing may copy them as one run. Nothing here imports torch at import time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from ..fileio import read_exact
from ..table import TensorEntry


@dataclass(frozen=True, slots=True)
class Piece:
    """``nbytes`` bytes starting ``start`` bytes into ``entry``'s C-order data."""

    entry: TensorEntry
    start: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class PiecedEntry(TensorEntry):
    """A tensor whose bytes are ``pieces`` laid end to end (in the entry's own dtype)."""

    pieces: tuple[Piece, ...] = ()


class Recipe(Protocol):
    """How a :class:`ComputedEntry`'s bytes are made from source entries."""

    @property
    def inputs(self) -> tuple[TensorEntry, ...]:
        """The source entries it reads."""
        ...

    def chunks(self, read: Reader, dtype: str) -> Iterator[memoryview]:
        """The output bytes in ``dtype``, in order, a bounded chunk at a time (imports torch)."""
        ...


@dataclass(frozen=True, slots=True)
class ComputedEntry(TensorEntry):
    """A tensor computed by ``recipe``; its ``dtype`` is the recipe's natural output dtype."""

    recipe: Recipe | None = None  # never None in practice: a default only because the base class has defaults

    def compute(self, read: Reader, dtype: str) -> Iterator[memoryview]:
        """The recipe's output bytes in ``dtype`` (see :meth:`Recipe.chunks`)."""
        if self.recipe is None:
            raise ValueError(f"computed tensor {self.name!r} has no recipe")
        return self.recipe.chunks(read, dtype)


#: One contiguous run of source bytes: ``(file, absolute offset, nbytes)``.
Range = tuple[str, int, int]


def byte_ranges(entry: TensorEntry) -> list[Range] | None:
    """The runs of source bytes that make up ``entry`` in order, or None when they must be materialized.

    Adjacent runs in the same file are merged.
    """
    if isinstance(entry, ComputedEntry):
        return None
    if isinstance(entry, PiecedEntry):
        ranges: list[Range] = []
        for piece in entry.pieces:
            inner = byte_ranges(piece.entry)
            if inner is None or len(inner) != 1:
                return None
            file, offset, _ = inner[0]
            _append(ranges, (file, offset + piece.start, piece.nbytes))
        return ranges
    return entry.ranges  # one run, or a chunked (DCP) tensor's Shard(0) chunks


def _append(ranges: list[Range], item: Range) -> None:
    if ranges and ranges[-1][0] == item[0] and ranges[-1][1] + ranges[-1][2] == item[1]:
        file, offset, nbytes = ranges[-1]
        ranges[-1] = (file, offset, nbytes + item[2])
    elif item[2]:
        ranges.append(item)


class Reader:
    """Reads source bytes and source entries for recipes; ``fd`` maps a source path to an open descriptor."""

    def __init__(self, fd) -> None:
        self.fd = fd

    def pread(self, path: str, offset: int, nbytes: int) -> bytearray:
        return read_exact(self.fd(path), nbytes, offset, path)

    def tensor(self, entry: TensorEntry):
        """``entry`` as a CPU torch tensor in its stored dtype (imports torch)."""
        import torch

        from ..dtypes import torch_dtype
        from ..materialize import load_tensor

        if isinstance(entry, ComputedEntry):  # a computed input of a layout change (dequantized experts, packed)
            data = bytearray()
            for chunk in entry.compute(self, entry.dtype):
                data += chunk
            if not data:
                return torch.empty(entry.shape, dtype=torch_dtype(entry.dtype))
            return torch.frombuffer(data, dtype=torch.uint8).view(torch_dtype(entry.dtype)).reshape(entry.shape)
        ranges = byte_ranges(entry)
        if isinstance(entry, PiecedEntry):
            dtype = torch_dtype(entry.dtype)
            if entry.nbytes == 0:
                return torch.empty(entry.shape, dtype=dtype)
            if ranges is not None:
                raw = bytearray()
                for file, offset, nbytes in ranges:
                    raw += self.pread(file, offset, nbytes)
                return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(entry.shape)
            parts = []
            for piece in entry.pieces:
                whole = self.tensor(piece.entry).contiguous().reshape(-1).view(torch.uint8)
                parts.append(whole[piece.start : piece.start + piece.nbytes])
            return torch.cat(parts).view(dtype).reshape(entry.shape)
        if entry.offset is not None or entry.storage is not None:
            handle = os.fdopen(os.dup(self.fd(entry.file)), "rb", buffering=0)
            try:
                return load_tensor(entry, handle)
            finally:
                handle.close()
        return load_tensor(entry)
