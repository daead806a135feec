"""The type checking configured in pyproject.toml ([tool.mypy]) is enforced, with the mypy pinned in the test extra."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_passes_on_the_configured_modules(tmp_path):
    if shutil.which("mypy") is None:
        pytest.fail("mypy is not installed: it is pinned in the test extra (pip install -e '.[test]')")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_package_ships_py_typed():
    assert (ROOT / "shardkit" / "py.typed").is_file()
    assert 'shardkit = ["py.typed"]' in (ROOT / "pyproject.toml").read_text()
