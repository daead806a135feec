"""Shard planning: which tensor goes into which output file, decided from the table alone.

Pure functions over :class:`~shardkit.table.TensorEntry` objects: nothing here reads tensor data, touches the
disk or imports torch. The default packing reproduces huggingface_hub's ``split_torch_state_dict_into_shards``
file assignment for the same state dict, so a checkpoint resharded by shardkit matches one saved upstream.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field

from ..dtypes import DTYPE_BITS, FLOATING, SAFETENSORS_DTYPES, TORCH_NAMES, nbytes_of
from ..errors import UsageError
from ..naming import OutputFormat, index_file_name, shard_file_name, single_file_name
from ..table import Checkpoint, TensorEntry
from .assemble import can_assemble
from .derived import byte_ranges

#: dtype -> rank in the safetensors writer's dtype order (declaration order of its ``Dtype`` enum, which the
#: reference writer sorts on, largest alignment first).
_DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(DTYPE_BITS)}

#: Output dtypes a torch zip can hold: those torch has a type for.
BIN_DTYPES = frozenset(TORCH_NAMES)


@dataclass(frozen=True, slots=True)
class PlannedTensor:
    """One tensor as it will be written: output ``dtype``/``nbytes`` and the ``source`` entry holding its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    source: TensorEntry

    @property
    def materialize(self) -> bool:
        """Whether the bytes cannot be copied as they are (a cast, a non-contiguous view, a legacy file, a computed
        tensor) and the tensor must go through torch. Chunked tensors that are not byte ranges are assembled
        without torch (:mod:`shardkit.write.assemble`)."""
        if self.dtype != self.source.dtype:
            return True
        return byte_ranges(self.source) is None and not can_assemble(self.source)

    @property
    def ranges(self) -> list[tuple[str, int, int]] | None:
        """The source byte runs to copy one after another, or None (materialized, or assembled by rows)."""
        return None if self.dtype != self.source.dtype else byte_ranges(self.source)


@dataclass(slots=True)
class PlannedFile:
    """One output file: the tensors it stores and, for ``.bin`` output, the names that share their storage."""

    name: str
    tensors: list[PlannedTensor] = field(default_factory=list)
    #: every name this file answers for, in output order, mapped to the stored tensor it reads from
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass(slots=True)
class Plan:
    """The whole output: files in order, the index's ``weight_map`` and ``metadata``, and dropped alias records."""

    format: OutputFormat
    files: list[PlannedFile]
    weight_map: dict[str, str]
    #: ``{dropped name: kept name}`` for safetensors output, which cannot hold shared tensors
    dropped: dict[str, str]
    total_size: int

    @property
    def sharded(self) -> bool:
        return len(self.files) > 1

    @property
    def index_name(self) -> str | None:
        return index_file_name(self.format) if self.sharded else None

    @property
    def index(self) -> dict | None:
        """The index JSON object huggingface_hub writes for this layout, or None for a single file."""
        if not self.sharded:
            return None
        return {"metadata": {"total_size": self.total_size, **self.dropped}, "weight_map": self.weight_map}

    def file_metadata(self) -> dict[str, str] | None:
        """``__metadata__`` of each safetensors file: ``format: pt``, plus the alias records for a single file."""
        if self.format != "safetensors":
            return None
        return {"format": "pt"} if self.sharded else {"format": "pt", **self.dropped}


def pack(items: Iterable[tuple[str, Hashable, int]], max_size: int) -> list[list[str]]:
    """Group ``(key, storage_id, size)`` items into shards the way huggingface_hub does.

    Next-fit in key order: a key whose ``storage_id`` was already seen is parked (its size is not counted) and
    later joins the shard of its group's first key, after that shard's own keys; a size strictly over
    ``max_size`` gets a shard of its own, appended at once without closing the shard being filled (so it takes
    the lower number); otherwise a key that would push the current shard over ``max_size`` closes it first.
    """
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    groups: dict[Hashable, list[str]] = {}
    for key, storage_id, size in items:
        if storage_id in groups:
            groups[storage_id].append(key)
            continue
        groups[storage_id] = [key]
        if size > max_size:
            shards.append([key])
            continue
        if current_size + size > max_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(key)
        current_size += size
    if current:
        shards.append(current)
    shard_of = {key: shard for shard in shards for key in shard}
    for keys in groups.values():
        if len(keys) > 1:
            shard_of[keys[0]].extend(keys[1:])
    return shards


#: A cast: one dtype for every floating tensor, or ``{name: dtype}`` for the tensors that change (from transforms).
Casts = str | Mapping[str, str] | None


def output_tensor(entry: TensorEntry, fmt: OutputFormat, dtype: Casts) -> PlannedTensor:
    """How ``entry`` is written in ``fmt``, cast to ``dtype`` if it is a floating tensor of another type (a mapping
    gives the dtype of each tensor that changes)."""
    out = entry.dtype
    if isinstance(dtype, Mapping):
        out = dtype.get(entry.name, out)
    elif dtype is not None and entry.dtype in FLOATING and entry.dtype in TORCH_NAMES:
        out = dtype
    allowed = SAFETENSORS_DTYPES if fmt == "safetensors" else BIN_DTYPES
    if out not in allowed:
        raise UsageError(
            f"tensor {entry.name!r} is {out}, which a {'.safetensors' if fmt == 'safetensors' else '.bin'} file cannot hold"
        )
    nbytes = entry.nbytes if out == entry.dtype else nbytes_of(out, entry.shape)
    assert nbytes is not None  # cast targets are whole-byte dtypes
    return PlannedTensor(name=entry.name, dtype=out, shape=entry.shape, nbytes=nbytes, source=entry)


def plan_split(checkpoint: Checkpoint, max_shard_size: int, fmt: OutputFormat = "safetensors", dtype: Casts = None) -> Plan:
    """Repack ``checkpoint`` into shards of at most ``max_shard_size`` bytes (a larger tensor gets its own).

    Safetensors output keeps one copy of each shared tensor (the name the reader kept, which for torch files is
    the alphabetically first, huggingface_hub's choice) and records the others in :attr:`Plan.dropped`;
    ``.bin`` output keeps every name, aliases parked in the shard of their group's first name.
    """
    _check_format(fmt)
    if max_shard_size <= 0:
        raise UsageError(f"max shard size must be positive, got {max_shard_size}")
    stored = {e.name: output_tensor(e, fmt, dtype) for e in checkpoint.stored}
    owner = {e.name: e.alias_of or e.name for e in checkpoint}
    if fmt == "safetensors":
        items = [(name, name, t.nbytes) for name, t in stored.items()]
    else:
        items = [(e.name, owner[e.name], stored[owner[e.name]].nbytes) for e in checkpoint]
    return _assemble(pack(items, max_shard_size), stored, owner, fmt)


def plan_convert(checkpoint: Checkpoint, fmt: OutputFormat = "safetensors", dtype: Casts = None) -> Plan:
    """Keep ``checkpoint``'s file layout: the ``i``-th source file becomes the ``i``-th output file, named for ``fmt``.

    Shared tensors are handled as in :func:`plan_split`; a name declared as an alias in metadata goes to the file
    holding its bytes.
    """
    _check_format(fmt)
    stored = {e.name: output_tensor(e, fmt, dtype) for e in checkpoint.stored}
    owner = {e.name: e.alias_of or e.name for e in checkpoint}
    by_file: dict[str, list[str]] = {info.path: [] for info in checkpoint.files}
    for entry in checkpoint:
        # An alias declared in metadata points at its kept tensor's file: it goes where the bytes are.
        by_file[stored[owner[entry.name]].source.file].append(entry.name)
    groups = []
    for names in by_file.values():
        if fmt == "safetensors":
            names = [n for n in names if owner[n] == n]
        if names:
            groups.append(names)
    return _assemble(groups, stored, owner, fmt)


def _assemble(groups: list[list[str]], stored: dict[str, PlannedTensor], owner: dict[str, str], fmt: OutputFormat) -> Plan:
    total = len(groups)
    files, weight_map = [], {}
    for number, names in enumerate(groups, start=1):
        planned = PlannedFile(name=shard_file_name(number, total, fmt) if total > 1 else single_file_name(fmt))
        for name in names:
            planned.keys[name] = owner[name]
            weight_map[name] = planned.name
            if owner[name] == name:
                planned.tensors.append(stored[name])
        files.append(planned)
    dropped = {name: kept for name, kept in owner.items() if name != kept} if fmt == "safetensors" else {}
    return Plan(
        format=fmt, files=files, weight_map=weight_map, dropped=dropped, total_size=sum(t.nbytes for t in stored.values())
    )


def safetensors_order(tensors: list[PlannedTensor]) -> list[PlannedTensor]:
    """The order the reference safetensors writer lays tensors out in: dtype rank descending, then name."""
    return sorted(tensors, key=lambda t: (-_DTYPE_RANK[t.dtype], t.name))


def _check_format(fmt: OutputFormat) -> None:
    if fmt not in ("safetensors", "bin"):
        raise UsageError(f"unknown output format {fmt!r}: use safetensors or bin")
