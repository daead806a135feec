"""With torch absent (as after `pip install shardkit`), the byte path works and the rest says what to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from builders import save_bin, tied_state_dict

ROOT = Path(__file__).parents[1]

BLOCK_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None\nfrom shardkit.cli import main\n"


def shardkit_without_torch(*args: str) -> subprocess.CompletedProcess:
    code = BLOCK_TORCH + f"main({list(args)!r}, prog_name='shardkit')\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


@pytest.fixture
def checkpoint(tmp_path):
    return save_bin(tied_state_dict(), tmp_path / "pytorch_model.bin")


def test_byte_path_needs_no_torch(tmp_path, checkpoint):
    for args in (
        ["inspect", str(checkpoint)],
        ["split", str(checkpoint), str(tmp_path / "st"), "--max-shard-size", "600", "--verify", "-q"],
        ["validate", str(tmp_path / "st")],
        ["convert", str(tmp_path / "st"), str(tmp_path / "bin"), "--format", "bin", "-q"],
        ["plan", str(tmp_path / "st"), "--max-memory", "cpu=1KB"],
    ):
        result = shardkit_without_torch(*args)
        assert result.returncode == 0, (args, result.stderr)


def test_a_cast_without_torch_is_one_line(tmp_path, checkpoint):
    result = shardkit_without_torch("split", str(checkpoint), str(tmp_path / "out"), "--dtype", "bf16")
    assert result.returncode == 2
    assert result.stderr.strip() == "shardkit: error: this needs torch, which is not installed: pip install 'shardkit[torch]'"
    assert not (tmp_path / "out").exists()
