"""The table of tensor entries: what a checkpoint holds and where exactly its bytes are.

This is the one data model every command shares. Readers in :mod:`shardkit.formats` build it from headers and
pickle metadata alone; the writer copies its byte ranges, the validator checks it, the loader materializes it.
Nothing here touches tensor data or imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Storage:
    """A torch storage record inside a zip checkpoint: ``nbytes`` raw bytes at absolute ``offset`` in ``file``."""

    key: str
    file: str
    offset: int
    nbytes: int
    dtype: str


@dataclass(frozen=True, slots=True)
class Chunk:
    """One block of a tensor whose bytes were saved in pieces (a DCP shard, an expert of a packed tensor).

    The block starts at ``offsets`` in the global tensor and spans ``sizes``; ``entry`` describes its bytes, in
    C order, like any stored tensor (it may be a strided view). ``entry.shape`` may differ from ``sizes`` (a
    reshape), never its element count.
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    entry: TensorEntry

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One named tensor.

    ``offset`` is the absolute file offset of the tensor's first byte when its ``nbytes`` bytes form one
    contiguous run in C order (always for safetensors; for a torch zip, when the view is contiguous). It is
    None for non-contiguous views (materialize through ``storage``, ``storage_offset`` and ``stride``) and for
    legacy torch files, whose bytes shardkit cannot address.

    ``alias_of`` names the entry whose bytes this one shares exactly (tied weights); an alias is never stored
    twice and is not counted in a checkpoint's totals.

    ``chunks`` is set for a tensor assembled from blocks (see :class:`Chunk`), which tile its shape exactly once
    (readers refuse gaps and overlaps). ``offset`` and ``storage`` then stay None unless a single chunk is the
    whole tensor; :attr:`ranges` says when the chunks are nonetheless a plain list of byte ranges.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str
    offset: int | None
    storage: Storage | None = None
    storage_offset: int = 0
    stride: tuple[int, ...] | None = None
    alias_of: str | None = None
    chunks: tuple[Chunk, ...] = ()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def byte_range(self) -> tuple[int, int] | None:
        """``(start, stop)`` absolute offsets in ``file``, or None when the bytes are not one run."""
        return None if self.offset is None else (self.offset, self.offset + self.nbytes)

    @property
    def ranges(self) -> list[tuple[str, int, int]] | None:
        """The tensor's bytes in C order as ``(file, start, nbytes)`` runs, or None when they are no such list.

        One run for a contiguous tensor; for a chunked one, its chunks in order when each is contiguous and they
        are whole slabs along dimension 0 (FSDP's ``Shard(0)``, packed experts), empty chunks left out. Any
        other layout (``Shard(1)``, 2-D meshes, strided chunks) needs :mod:`shardkit.write.assemble`.
        """
        if self.offset is not None:
            return [(self.file, self.offset, self.nbytes)]
        if not self.chunks:
            return None
        runs = []
        for chunk in sorted(self.chunks, key=lambda c: c.offsets):
            if chunk.numel == 0:
                continue
            if chunk.entry.offset is None or tuple(chunk.sizes[1:]) != tuple(self.shape[1:]):
                return None
            runs.append((chunk.entry.file, chunk.entry.offset, chunk.entry.nbytes))
        return runs


@dataclass(slots=True)
class FileInfo:
    """One checkpoint file as its header describes it."""

    path: str
    format: str  # "safetensors", "torch-zip" or "torch-legacy"
    size: int
    tensors: list[str] = field(default_factory=list)  # names stored in this file, in file order
    metadata: dict[str, str] | None = None  # safetensors __metadata__
    header_size: int | None = None  # safetensors: the JSON header's length N (data starts at 8 + N)
    skipped: dict[str, str] = field(default_factory=dict)  # non-tensor entries of a pickle -> what they are


@dataclass(slots=True)
class IndexInfo:
    """A sharded checkpoint's ``*.index.json``."""

    path: str
    metadata: dict
    weight_map: dict[str, str]


@dataclass(slots=True)
class Checkpoint:
    """Every tensor of a checkpoint (aliases included, in load order), its files, and its index if sharded."""

    source: str
    format: str
    entries: dict[str, TensorEntry]
    files: list[FileInfo]
    root: str | None = None
    index: IndexInfo | None = None
    #: DCP: each flat name's key path in the nested state dict it was saved from (``("model", "lm_head.weight")``)
    key_paths: dict[str, tuple] = field(default_factory=dict)

    def __iter__(self):
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, name: str) -> TensorEntry:
        return self.entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    @property
    def stored(self) -> list[TensorEntry]:
        """Entries that own their bytes (aliases left out), in load order."""
        return [e for e in self.entries.values() if e.alias_of is None]

    @property
    def aliases(self) -> dict[str, str]:
        """``{alias: name it shares bytes with}``."""
        return {e.name: e.alias_of for e in self.entries.values() if e.alias_of is not None}

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data, each shared tensor counted once: the index's ``metadata.total_size``."""
        return sum(e.nbytes for e in self.stored)

    @property
    def total_params(self) -> int:
        return sum(e.numel for e in self.stored)

    def file(self, path: str) -> FileInfo:
        for info in self.files:
            if info.path == path:
                return info
        raise KeyError(path)
