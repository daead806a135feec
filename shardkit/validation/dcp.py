"""Validation of a torch.distributed.checkpoint folder: its ``.metadata`` against the ``.distcp`` files it names.

The DCP reader does the checking (chunks that tile each tensor, byte ranges inside their files, embedded records
that exist and agree with the metadata's dtype and chunk size); here it runs in its collecting mode, so every
tensor that cannot be read becomes a finding, and ``.distcp`` files that ``.metadata`` never uses are reported.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError
from ..formats.dcp import METADATA_NAME, dcp_folder, hf_shard_files, read_dcp, read_hf_sharded
from ..table import Checkpoint
from .report import Report


def is_dcp_target(path: Path) -> bool:
    """A DCP folder, its ``.metadata`` file, or a folder of ``.distcp`` files that lost its ``.metadata``."""
    folder = dcp_folder(path)
    if path.name == METADATA_NAME or (folder / METADATA_NAME).exists():
        return True
    return folder.is_dir() and (any(name.endswith(".distcp") for name in os.listdir(folder)) or bool(hf_shard_files(folder)))


def check_dcp(path: Path, report: Report) -> Checkpoint | None:
    """Record every problem of the DCP checkpoint at ``path`` in ``report``; return its readable table, if any."""
    folder = dcp_folder(path)
    report.checkpoint = METADATA_NAME

    def shown(file: str) -> str:
        return os.path.relpath(file, folder) if os.path.isabs(file) else file

    problems: list[CheckpointError] = []
    hf_shards = [] if (folder / METADATA_NAME).exists() or path.name == METADATA_NAME else hf_shard_files(folder)
    if hf_shards:
        report.checkpoint = hf_shards[0]
    try:
        if hf_shards:  # torch's distributed HF layout: its safetensors headers are the metadata
            checkpoint = read_hf_sharded(str(path), folder, hf_shards)
        else:
            checkpoint = read_dcp(str(path), path, problems=problems)
    except CheckpointError as exc:
        report.add(exc.code, f"{exc.problem}.", file=shown(exc.path))
        return None
    for problem in problems:
        report.add(problem.code, f"{problem.problem}.", file=shown(problem.path))
    used = {os.path.basename(info.path) for info in checkpoint.files}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".distcp") and name not in used and not problems:
            report.add("stale-shard", ".metadata stores nothing in this file (left over from another save?).", file=name)
    report.files_checked = len(checkpoint.files) + (0 if hf_shards else 1)
    report.tensors_checked = len(checkpoint)
    return checkpoint
