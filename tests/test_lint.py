"""The lint configured in pyproject.toml is enforced: the suite fails where ``ruff`` would complain."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TREES = ["shardkit", "tests", "scripts"]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("ruff") is None:
        pytest.fail("ruff is not installed: it is pinned in the test extra (pip install -e '.[test]')")
    return subprocess.run(["ruff", *args, *TREES], cwd=ROOT, capture_output=True, text=True, check=False)


def test_ruff_check_passes():
    result = _ruff("check", "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_applied():
    result = _ruff("format", "--check", "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr
