"""Run shardkit from this worktree in a child process, and read back checkpoints for comparisons."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    env.update(extra)
    return env


def run_shardkit(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``python -m shardkit ARGS`` with this worktree's package; text output captured."""
    return subprocess.run(
        [sys.executable, "-m", "shardkit", *map(str, args)],
        capture_output=True,
        text=True,
        env=env or child_env(),
        cwd=ROOT,
        **kwargs,
    )


def run_python(code: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env or child_env(), cwd=ROOT, **kwargs
    )


def folder_digest(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder``: proves a folder was left untouched."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


def load_any(folder: Path) -> dict:
    """Every tensor of the checkpoint in ``folder`` as loaded by safetensors / torch themselves (weights only)."""
    import torch
    from safetensors.torch import load_file

    state = {}
    for path in sorted(Path(folder).iterdir()):
        if path.suffix == ".safetensors":
            state.update(load_file(path))
        elif path.suffix == ".bin":
            state.update(torch.load(path, weights_only=True))
    return state
