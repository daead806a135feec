"""Progress bars: on a terminal only, not with -q, in the summary's decimal units, one bar per pass."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import torch
from builders import save_safetensors
from cli_helpers import ROOT, child_env


def run_on_terminal(*args) -> tuple[int, str]:
    """Run shardkit with stderr on a pseudo-terminal; return its exit code and everything written there."""
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "shardkit", *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env=child_env(),
        cwd=ROOT,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return process.wait(timeout=60), b"".join(chunks).decode(errors="replace")


def checkpoint(tmp_path):
    # 3,000,000 bytes of tensor data: 3.00MB in decimal units, 2.86 in binary ones
    return save_safetensors({"a": torch.ones(500_000), "b": torch.ones(250_000)}, tmp_path / "model.safetensors")


def test_split_verify_shows_a_write_bar_then_a_verify_bar_in_megabytes(tmp_path):
    code, err = run_on_terminal("split", checkpoint(tmp_path), tmp_path / "out", "--verify", "--max-shard-size", "2MB")
    assert code == 0, err
    assert "writing" in err and "verifying" in err
    assert "3.00MB" in err and "2.86" not in err


def test_quiet_and_json_hide_the_bars(tmp_path):
    source = checkpoint(tmp_path)
    for extra in (["-q"], ["--json"]):
        code, err = run_on_terminal("split", source, tmp_path / f"out{len(extra[0])}", "--verify", *extra)
        assert code == 0 and err == "", err


def test_validate_checksums_and_deep_show_a_bar(tmp_path):
    source = checkpoint(tmp_path)
    code, err = run_on_terminal("validate", source, "--checksums", tmp_path / "sums.json")
    assert code == 0 and "hashing tensors" in err and "3.00MB" in err, err
    code, err = run_on_terminal("validate", source, "--deep")
    assert code == 0 and "checking tensors" in err, err
    code, err = run_on_terminal("validate", source, "--deep", "-q")
    assert code == 0 and err == "", err


def test_a_cast_says_it_is_importing_torch(tmp_path):
    code, err = run_on_terminal("split", checkpoint(tmp_path), tmp_path / "out", "--dtype", "bf16")
    assert code == 0, err
    assert "importing torch" in err and err.index("importing torch") < err.index("writing")


def test_loading_shows_a_bar_with_opt_outs(tmp_path, monkeypatch, capsys):
    import shardkit.progress
    from shardkit import load_checkpoint_in_model

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    path = save_safetensors(model.state_dict(), tmp_path / "model.safetensors")
    monkeypatch.setattr(shardkit.progress, "_terminal", lambda: True)  # stderr is captured, not a terminal
    monkeypatch.delenv("SHARDKIT_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    load_checkpoint_in_model(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)), path)
    assert "loading" in capsys.readouterr().err
    load_checkpoint_in_model(model, path, progress=False)
    assert capsys.readouterr().err == ""
    for name in ("SHARDKIT_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(name, "1")
        load_checkpoint_in_model(model, path)
        assert capsys.readouterr().err == "", name
        monkeypatch.delenv(name)
    load_checkpoint_in_model(model, path, progress=True)
    assert "loading" in capsys.readouterr().err
