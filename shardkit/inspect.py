"""What ``shardkit inspect`` reports: a plain-data summary of a :class:`~shardkit.table.Checkpoint`."""

from __future__ import annotations

import os

from .table import Checkpoint, TensorEntry


def summarize(checkpoint: Checkpoint) -> dict:
    """Counts, sizes, dtype shares, files, largest tensor, aliases and skipped entries of ``checkpoint``.

    Sizes are bytes; paths of files are relative to the checkpoint's folder. The result is JSON-ready.
    """
    stored = checkpoint.stored
    total = checkpoint.total_bytes
    dtypes: dict[str, dict] = {}
    for entry in stored:
        row = dtypes.setdefault(entry.dtype, {"tensors": 0, "params": 0, "bytes": 0})
        row["tensors"] += 1
        row["params"] += entry.numel
        row["bytes"] += entry.nbytes
    for row in dtypes.values():
        row["share"] = row["bytes"] / total if total else 0.0
    largest = max(stored, key=lambda e: e.nbytes, default=None)
    root = checkpoint.root or ""
    files = [
        {
            "path": os.path.relpath(info.path, root) if root else info.path,
            "format": info.format,
            "size": info.size,
            "tensors": len(info.tensors),
        }
        for info in checkpoint.files
    ]
    skipped = {name: what for info in checkpoint.files for name, what in info.skipped.items()}
    extra = {"groups": groups(checkpoint), "sharding": sharding(checkpoint)} if checkpoint.format == "dcp" else {}
    return {
        "source": checkpoint.source,
        "format": checkpoint.format,
        "sharded": checkpoint.index is not None,
        "index": os.path.relpath(checkpoint.index.path, root) if checkpoint.index else None,
        "tensors": len(stored),
        "params": checkpoint.total_params,
        "bytes": total,
        "dtypes": dict(sorted(dtypes.items(), key=lambda item: -item[1]["bytes"])),
        "largest": None
        if largest is None
        else {"name": largest.name, "dtype": largest.dtype, "shape": list(largest.shape), "bytes": largest.nbytes},
        "aliases": checkpoint.aliases,
        "files": files,
        "skipped": skipped,
        "metadata": checkpoint.index.metadata if checkpoint.index else (checkpoint.files[0].metadata or {}),
        **extra,
    }


def groups(checkpoint: Checkpoint) -> dict[str, dict]:
    """Top-level groups of a training state dict (``model``, ``optim``…): tensors, bytes and non-tensor items each."""
    from .formats.dcp import group_of

    result: dict[str, dict] = {}
    for entry in checkpoint.stored:
        row = result.setdefault(group_of(checkpoint, entry.name), {"tensors": 0, "bytes": 0, "items": 0})
        row["tensors"] += 1
        row["bytes"] += entry.nbytes
    for info in checkpoint.files:
        for name in info.skipped:
            result.setdefault(group_of(checkpoint, name), {"tensors": 0, "bytes": 0, "items": 0})["items"] += 1
    return result


def split_dims(entry: TensorEntry) -> tuple[int, ...]:
    """The dimensions along which a chunked tensor was cut (empty: stored whole)."""
    return tuple(d for d in range(len(entry.shape)) if any(c.numel and c.sizes[d] != entry.shape[d] for c in entry.chunks))


def sharding(checkpoint: Checkpoint) -> dict:
    """How the tensors of a chunked checkpoint were cut: per layout (``whole``, ``dim 0``, ``dims 0,1``…) the tensors,
    bytes and chunk counts, and how many tensors are plain byte-range copies."""
    layouts: dict[str, dict] = {}
    copies = 0
    for entry in checkpoint.stored:
        dims = split_dims(entry)
        key = "whole" if not dims else ("dim " if len(dims) == 1 else "dims ") + ",".join(map(str, dims))
        row = layouts.setdefault(key, {"tensors": 0, "bytes": 0, "chunks_min": None, "chunks_max": 0})
        count = sum(1 for c in entry.chunks if c.numel) or 1
        row["tensors"] += 1
        row["bytes"] += entry.nbytes
        row["chunks_min"] = count if row["chunks_min"] is None else min(row["chunks_min"], count)
        row["chunks_max"] = max(row["chunks_max"], count)
        copies += entry.ranges is not None
    return {"layouts": layouts, "byte_range_copies": copies}
