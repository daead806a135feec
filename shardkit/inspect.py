"""What ``shardkit inspect`` reports: a plain-data summary of a :class:`~shardkit.table.Checkpoint`."""

from __future__ import annotations

import os

from .table import Checkpoint


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
    }
