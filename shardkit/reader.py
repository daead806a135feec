"""Open any checkpoint layout as one :class:`~shardkit.table.Checkpoint`, reading headers only.

Accepted: a single ``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth`` file, an ``*.index*.json`` file, a folder
holding either, a local Hugging Face cache (a ``models--org--name`` folder or one of its snapshots), and a
torch.distributed.checkpoint folder (or its ``.metadata`` file).
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from .errors import CheckpointError
from .formats import open_file
from .formats.dcp import hf_shard_files, is_dcp, read_dcp, read_hf_sharded
from .naming import format_of_name, select_checkpoint
from .paths import check_relative_name, resolve_cache_repo, resolve_in_folder
from .table import Checkpoint, FileInfo, IndexInfo, TensorEntry

#: Index files hold names and file names only; a real one is far below this.
MAX_INDEX_SIZE = 256 * 1024 * 1024

#: Metadata keys writers put in headers and indexes that are never alias records.
_RESERVED_METADATA = frozenset({"format", "total_size", "total_parameters"})


def open_checkpoint(path: str | os.PathLike, *, variant: str | None = None, revision: str = "main") -> Checkpoint:
    """Read the table of a checkpoint at ``path`` (file, index, folder or Hugging Face cache folder).

    ``variant`` picks ``model.<variant>.safetensors`` and friends in a folder; ``revision`` picks the snapshot of
    a ``models--org--name`` cache folder. Raises :class:`~shardkit.errors.CheckpointError` (a subclass for
    unsafe paths and non-checkpoints) naming the file and the problem.
    """
    source = os.fspath(path)
    target = Path(source)
    if not target.exists():
        raise CheckpointError(source, "no such file or folder", code="missing-file")
    if is_dcp(target):
        return read_dcp(source, target)
    if target.is_dir() and (shards := hf_shard_files(target)):
        return read_hf_sharded(source, target, shards)
    if target.is_dir():
        target = _resolve_folder(resolve_cache_repo(target, revision), variant)
    if target.name.endswith(".json"):
        return _open_index(source, target)
    return assemble_checkpoint(source, [(target.name, *open_file(str(target)))], root=str(target.parent))


def read_index(path: str | os.PathLike) -> IndexInfo:
    """Parse an ``*.index.json``: ``{"metadata": {...}, "weight_map": {tensor: file}}`` (or accelerate's flat map)."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        if size > MAX_INDEX_SIZE:
            raise CheckpointError(path, f"index is {size} bytes, over the {MAX_INDEX_SIZE}-byte limit", code="index-invalid")
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise CheckpointError(path, "no such index file", code="missing-file") from None
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror})", code="unreadable") from None
    return parse_index(path, data)


def parse_index(path: str, data: bytes) -> IndexInfo:
    """Parse the bytes of an index file; ``path`` only names it in errors (it may be a remote file)."""
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CheckpointError(path, f"index is not valid JSON ({exc})", code="index-invalid") from None
    if not isinstance(parsed, dict):
        raise CheckpointError(path, "index is not a JSON object", code="index-invalid")
    weight_map = parsed.get("weight_map")
    metadata = parsed.get("metadata") or {}
    if weight_map is None and parsed and all(isinstance(v, str) for v in parsed.values()):
        weight_map, metadata = parsed, {}  # accelerate's flat {param: file} form
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(path, "index has no weight_map of tensor names to file names", code="index-invalid")
    if not isinstance(metadata, dict):
        raise CheckpointError(path, "index metadata is not an object", code="index-invalid")
    return IndexInfo(path=path, metadata=metadata, weight_map=weight_map)


def _resolve_folder(folder: Path, variant: str | None) -> Path:
    """The file or index that holds a folder's checkpoint, in transformers' order of preference."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    try:
        return folder / select_checkpoint(names, str(folder), variant, hint="; pass the file or index to use")
    except CheckpointError as exc:
        if exc.code == "no-checkpoint" and any(name.endswith(".distcp") for name in names):
            per_rank = "__0.metadata" in names  # a save without collectives: one metadata file per rank
            raise CheckpointError(
                str(folder / ".metadata"),
                "is missing: the folder holds DCP .distcp files, which cannot be read without it"
                + (" (per-rank __N.metadata files, from a save without collectives, are not supported)" if per_rank else ""),
                code="dcp-metadata-missing",
            ) from None
        raise


def _open_index(source: str, index_path: Path) -> Checkpoint:
    index = read_index(index_path)
    folder = index_path.parent
    opened = []
    for name in sorted(set(index.weight_map.values())):
        file_path = resolve_in_folder(folder, name, index_path=str(index_path))
        if not file_path.exists():
            raise CheckpointError(str(index_path), f"names {name!r}, which is missing from {folder}", code="missing-shard")
        opened.append((name, *open_file(str(file_path))))
    return assemble_checkpoint(source, opened, root=str(folder), index=index, index_label=str(index_path))


def assemble_checkpoint(
    source: str,
    opened: list[tuple[str, FileInfo, list[TensorEntry]]],
    *,
    root: str,
    index: IndexInfo | None = None,
    index_label: str | None = None,
) -> Checkpoint:
    """One :class:`Checkpoint` from its opened files ``(name, info, entries)`` and, when sharded, its index.

    Refuses a tensor stored in two files and an index key no file holds (unless a writer recorded it as an alias);
    adds the aliases writers record in metadata. ``index_label`` names the index in errors (a path or a repo file).
    """
    checkpoint = Checkpoint(source=source, format="", entries={}, files=[], root=root, index=index)
    for _, info, entries in opened:
        checkpoint.files.append(info)
        _add_entries(checkpoint, entries, index_path=index_label)
    formats = {info.format for _, info, _ in opened}
    named = {format_of_name(name) for name, _, _ in opened}
    checkpoint.format = formats.pop() if len(formats) == 1 and len(named) == 1 else "mixed"

    # Aliases declared by writers that drop shared tensors: huggingface_hub in the index metadata (or a single
    # file's __metadata__), the safetensors conversion script in each shard's __metadata__ (while still listing
    # the name in weight_map).
    add_declared_aliases(checkpoint, index.metadata if index else {})
    for info in checkpoint.files:
        add_declared_aliases(checkpoint, info.metadata or {})
    for name, file_name in (index.weight_map if index else {}).items():
        if name not in checkpoint.entries:
            raise CheckpointError(
                index_label, f"maps {name!r} to {file_name!r}, but that file holds no such tensor", code="index-key-missing"
            )
    return checkpoint


def _add_entries(checkpoint: Checkpoint, entries: list[TensorEntry], *, index_path: str | None = None) -> None:
    for entry in entries:
        previous = checkpoint.entries.get(entry.name)
        if previous is not None:
            raise CheckpointError(
                index_path or entry.file,
                f"tensor {entry.name!r} is stored in both {os.path.basename(previous.file)} and {os.path.basename(entry.file)}",
                code="duplicate-tensor",
            )
        checkpoint.entries[entry.name] = entry


def add_declared_aliases(checkpoint: Checkpoint, metadata: dict) -> None:
    """Add ``{dropped_name: kept_name}`` records from metadata as alias entries of the kept tensor."""
    for alias, kept in metadata.items():
        if alias in _RESERVED_METADATA or not isinstance(kept, str) or alias in checkpoint.entries:
            continue
        target = checkpoint.entries.get(kept)
        if target is None:
            continue
        target = checkpoint.entries.get(target.alias_of, target) if target.alias_of else target
        checkpoint.entries[alias] = TensorEntry(
            name=alias,
            dtype=target.dtype,
            shape=target.shape,
            nbytes=target.nbytes,
            file=target.file,
            offset=target.offset,
            storage=target.storage,
            storage_offset=target.storage_offset,
            stride=target.stride,
            alias_of=target.name,
        )


#: Kept for callers of the former private names.
_resolve_cache_repo = resolve_cache_repo
_add_declared_aliases = add_declared_aliases
__all__ = [
    "open_checkpoint",
    "read_index",
    "parse_index",
    "assemble_checkpoint",
    "add_declared_aliases",
    "resolve_in_folder",
    "check_relative_name",
    "resolve_cache_repo",
    "MAX_INDEX_SIZE",
]
