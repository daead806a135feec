"""Materialize table entries as torch tensors: the only place the byte path meets torch.

Contiguous entries are read straight from their byte range; non-contiguous views are rebuilt over their
storage's bytes with ``as_strided``; legacy torch files come from :func:`shardkit.formats.legacy.load_legacy`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO

from .dtypes import torch_dtype
from .fileio import read_exact
from .formats.legacy import load_legacy
from .table import TensorEntry

if TYPE_CHECKING:  # annotations only: importing this module must not import torch
    import torch


def load_tensor(entry: TensorEntry, handle: BinaryIO | None = None) -> torch.Tensor:
    """The tensor ``entry`` describes, on the CPU, in its stored dtype, owning its memory.

    ``handle`` may be an open binary handle of ``entry.file`` to avoid reopening it per tensor.
    """
    import torch

    if entry.offset is None and entry.chunks:
        return _load_chunked(entry)
    if entry.offset is None and entry.storage is None:
        tensor = load_legacy(entry.file)[entry.name]
        return tensor.clone() if not tensor.is_contiguous() else tensor
    dtype = torch_dtype(entry.dtype)
    own = handle is None
    if own:
        handle = open(entry.file, "rb")
    try:
        if entry.offset is not None:
            if entry.nbytes == 0:
                return torch.empty(entry.shape, dtype=dtype)
            raw = read_exact(handle.fileno(), entry.nbytes, entry.offset, entry.file)
            return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(entry.shape)
        storage = entry.storage
        raw = read_exact(handle.fileno(), storage.nbytes, storage.offset, entry.file)
        flat = torch.frombuffer(raw, dtype=torch.uint8).view(dtype)
        return flat.as_strided(entry.shape, entry.stride, entry.storage_offset).contiguous()
    finally:
        if own:
            handle.close()


def _load_chunked(entry: TensorEntry) -> torch.Tensor:
    """A tensor saved in chunks (DCP): assembled by rows without torch when every chunk is one byte run, else
    chunk by chunk into its block of the result."""
    import os

    import torch

    from .write.assemble import assembled, can_assemble

    dtype = torch_dtype(entry.dtype)
    fds: dict[str, int] = {}

    def fd_of(path: str) -> int:
        if path not in fds:
            fds[path] = os.open(path, os.O_RDONLY)
        return fds[path]

    try:
        if can_assemble(entry):
            raw = bytearray(entry.nbytes)
            position = 0
            for piece in assembled(entry, fd_of):
                raw[position : position + len(piece)] = piece
                position += len(piece)
            if not raw:
                return torch.empty(entry.shape, dtype=dtype)
            return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(entry.shape)
    finally:
        for fd in fds.values():
            os.close(fd)
    result = torch.empty(entry.shape, dtype=dtype)
    for chunk in entry.chunks:
        if chunk.numel:
            block = result[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))]
            block.copy_(load_tensor(chunk.entry).reshape(chunk.sizes))
    return result
