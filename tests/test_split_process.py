"""Whole-process properties of split/convert: no torch on the byte path, bounded memory, atomic under kill and full disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from builders import save_bin, save_sharded, tied_state_dict, varied_state_dict
from cli_helpers import ROOT, child_env, load_any, run_python, run_shardkit

import shardkit
from shardkit.formats.safetensors import build_header
from shardkit.write.byteio import BUFFER_SIZE

#: Run the CLI in-process and report whether torch got imported and the peak RSS in KiB. (VmHWM, not ru_maxrss:
#: Linux carries the parent's RSS at fork into a child's ru_maxrss across exec, and this parent holds torch.)
CHILD = """
import sys
from shardkit.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    peak = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
    print("TORCH" if "torch" in sys.modules else "NO-TORCH", peak, file=sys.stderr)
"""


def run_child(*args) -> tuple[subprocess.CompletedProcess, bool, int]:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True, env=child_env(), cwd=ROOT
    )
    marker, rss = result.stderr.strip().splitlines()[-1].split()
    return result, marker == "TORCH", int(rss) * 1024


def lm_state():
    state = varied_state_dict()
    state.update(tied_state_dict(4))
    return state


@pytest.mark.parametrize(
    "command",
    [
        ["split", "{bin}", "{out}", "--max-shard-size", "300"],
        ["split", "{bin}", "{out}", "--format", "bin", "--verify"],
        ["convert", "{sharded}", "{out}", "--verify"],
        ["convert", "{st}", "{out}", "--format", "bin"],
        ["split", "{bin}", "{out}", "--dry-run", "--json"],
    ],
)
def test_byte_path_never_imports_torch(tmp_path, command):
    save_bin(lm_state(), tmp_path / "src.bin")
    (tmp_path / "sharded").mkdir()
    save_sharded(lm_state(), tmp_path / "sharded", 400, safe=False)
    shardkit.split(tmp_path / "src.bin", tmp_path / "st", max_shard_size=500)
    paths = {"bin": tmp_path / "src.bin", "sharded": tmp_path / "sharded", "st": tmp_path / "st", "out": tmp_path / "out"}
    result, imported, _ = run_child(*[part.format(**paths) for part in command])
    assert result.returncode == 0, result.stderr
    assert not imported


def test_cast_imports_torch_only_then(tmp_path):
    save_bin(lm_state(), tmp_path / "src.bin")
    result, imported, _ = run_child("split", tmp_path / "src.bin", tmp_path / "out", "--dtype", "fp16")
    assert result.returncode == 0 and imported


def make_large_safetensors(path: Path, tensors: int, tensor_bytes: int) -> int:
    """A valid safetensors file of ``tensors`` F32 tensors of ``tensor_bytes`` each, written sparse (no RAM, no time)."""
    layout = [(f"layers.{i:03d}.weight", "F32", (tensor_bytes // 4,), tensor_bytes) for i in range(tensors)]
    header = build_header(layout, {"format": "pt"})
    with open(path, "wb") as handle:
        handle.write(header)
        for i in range(tensors):  # a few real bytes per tensor, the rest holes
            handle.seek(len(header) + i * tensor_bytes)
            handle.write(os.urandom(4096))
        handle.truncate(len(header) + tensors * tensor_bytes)
    return tensors * tensor_bytes


def test_peak_memory_stays_bounded(tmp_path):
    """Resharding 320 MB (to safetensors and to .bin, and back) keeps the process near its start-up size."""
    total = make_large_safetensors(tmp_path / "model.safetensors", 40, 8 * 1024 * 1024)
    baseline = run_child("--help")[2]
    runs = [
        ("split", tmp_path / "model.safetensors", tmp_path / "st", "--max-shard-size", "100MB", "--verify"),
        ("split", tmp_path / "model.safetensors", tmp_path / "bin", "--max-shard-size", "100MB", "--format", "bin", "--verify"),
        ("convert", tmp_path / "bin", tmp_path / "back"),
    ]
    for args in runs:
        result, imported, peak = run_child(*args)
        assert result.returncode == 0, result.stderr
        assert not imported
        # bound: start-up + two copy buffers (when verifying) + a little bookkeeping; the 320 MB never gets in
        assert peak - baseline < 2 * BUFFER_SIZE + 8 * 1024 * 1024, (args[0], peak, baseline)
        assert peak < total / 4
    assert shardkit.open_checkpoint(tmp_path / "back").total_bytes == total


def test_peak_memory_with_a_cast_is_one_tensor_not_the_checkpoint(tmp_path):
    """--dtype goes through torch one tensor at a time: above torch's own footprint, the largest tensor counts."""
    tensor = 32 * 1024 * 1024
    total = make_large_safetensors(tmp_path / "model.safetensors", 8, tensor)
    torch_baseline = run_python(
        "import torch, shardkit.cli; print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0])"
    )
    baseline = int(torch_baseline.stdout) * 1024
    result, imported, peak = run_child("split", tmp_path / "model.safetensors", tmp_path / "out", "--dtype", "bf16")
    assert result.returncode == 0 and imported
    # its F32 bytes + its BF16 copy, plus slack for the allocator and the copy buffer; the checkpoint is 256 MiB
    assert peak - baseline < tensor + tensor // 2 + 24 * 1024 * 1024, (peak, baseline)
    assert shardkit.open_checkpoint(tmp_path / "out").total_bytes == total // 2


@pytest.mark.parametrize("how", ["kill", "interrupt", "terminate", "hangup"])
def test_interrupted_run_leaves_no_destination_and_rerun_succeeds(tmp_path, how):
    save_bin(lm_state(), tmp_path / "src.bin")
    out = tmp_path / "out"
    env = child_env(SHARDKIT_TEST_STALL_AFTER_FILE="60")
    process = subprocess.Popen(
        [sys.executable, "-m", "shardkit", "split", str(tmp_path / "src.bin"), str(out), "--max-shard-size", "300"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
        text=True,
    )
    try:
        assert process.stderr.readline().startswith("shardkit: wrote ")  # first shard written, the run is stalled
        temp = [p for p in tmp_path.iterdir() if p.name.startswith(".out.shardkit-tmp-")]
        assert len(temp) == 1 and any(temp[0].iterdir())
        signum = {"kill": signal.SIGKILL, "interrupt": signal.SIGINT, "terminate": signal.SIGTERM, "hangup": signal.SIGHUP}[how]
        process.send_signal(signum)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert not out.exists()
    if how == "kill":
        assert process.returncode == -signal.SIGKILL
        assert temp[0].exists()  # nothing could clean up; the next run will
    elif how == "interrupt":
        assert process.returncode == 130 and "interrupted" in err
        assert not temp[0].exists()
    else:  # kill, timeout, docker stop, Slurm, a closed terminal: cleaned up like Ctrl-C
        assert process.returncode == 128 + signum, err
        assert err.strip().splitlines()[-1] == (
            f"shardkit: terminated ({signal.Signals(signum).name}); nothing was left half-written"
        )
        assert not temp[0].exists()
    result = run_shardkit("split", tmp_path / "src.bin", out, "--max-shard-size", "300")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src.bin"]  # stale temporary folder removed
    assert len(load_any(out)) == len(lm_state()) - 1


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_full_disk_leaves_nothing(tmp_path, fmt):
    save_bin(lm_state(), tmp_path / "src.bin")
    code = f"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))
from shardkit.cli import main
main(["split", {str(tmp_path / 'src.bin')!r}, {str(tmp_path / 'out')!r}, "--format", {fmt!r}])
"""
    result = run_python(code)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write the output (the disk is full); nothing was written" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.bin"]


def test_json_summary_of_a_real_run(tmp_path):
    save_bin(lm_state(), tmp_path / "src.bin")
    result = run_shardkit("convert", tmp_path / "src.bin", tmp_path / "out", "--json", "--verify")
    summary = orjson.loads(result.stdout)
    assert summary["files"] == [
        {"name": "model.safetensors", "size": (tmp_path / "out" / "model.safetensors").stat().st_size, "tensors": 16}
    ]
    assert (
        summary["verified"]
        and summary["dropped"] == {"model.embed_tokens.weight": "lm_head.weight"}
        and summary["materialized"] == 0
    )


def test_killed_overwrite_keeps_the_old_checkpoint(tmp_path):
    """With --overwrite, DST is swapped whole: a run killed midway leaves the old checkpoint exactly as it was."""
    save_bin(lm_state(), tmp_path / "src.bin")
    out = tmp_path / "out"
    shardkit.split(tmp_path / "src.bin", out, max_shard_size=1000)
    (out / "config.json").write_text('{"keep": true}')
    (out / "tokenizer").mkdir()
    (out / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shardkit",
            "split",
            str(tmp_path / "src.bin"),
            str(out),
            "--max-shard-size",
            "300",
            "--overwrite",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(SHARDKIT_TEST_STALL_AFTER_FILE="60"),
        cwd=ROOT,
        text=True,
    )
    try:
        assert process.stderr.readline().startswith("shardkit: wrote ")
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    finally:
        process.kill()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    result = run_shardkit("split", tmp_path / "src.bin", out, "--max-shard-size", "300", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (out / "config.json").read_text() == '{"keep": true}' and (out / "tokenizer" / "vocab.txt").read_text() == "a\nb\n"
    assert len(list(out.glob("model-*-of-00009.safetensors"))) == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src.bin"]


def test_swap_interrupted_between_its_renames_is_repaired(tmp_path):
    """A crash after DST was set aside and before the new folder took its place: the next run puts the old one back."""
    from shardkit.write.staging import remove_stale

    save_bin(lm_state(), tmp_path / "src.bin")
    out = tmp_path / "out"
    shardkit.split(tmp_path / "src.bin", out, max_shard_size=1000)
    before = sorted(os.listdir(out))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    aside = tmp_path / f".out.shardkit-old-{dead}-x1"
    os.replace(out, aside)
    remove_stale(tmp_path)
    assert sorted(os.listdir(out)) == before and not aside.exists()
    assert shardkit.open_checkpoint(out).total_bytes == shardkit.open_checkpoint(tmp_path / "src.bin").total_bytes


@pytest.mark.parametrize(
    ("command", "code"),
    [
        (["split", "{src}", "{out}", "--max-shard-size", "300"], 0),
        (["split", "{src}", "{out}", "--max-shard-size", "300", "--json"], 0),
        (["inspect", "{src}", "--tensors"], 0),
        (["validate", "{src}"], 0),
        (["validate", "{broken}"], 1),
    ],
)
def test_a_reader_that_goes_away_is_not_an_error(tmp_path, command, code):
    """`shardkit ... | head`: output stops quietly; the exit code is the one the work earned."""
    save_bin(lm_state(), tmp_path / "src.bin")
    (tmp_path / "broken.safetensors").write_bytes((tmp_path / "src.bin").read_bytes()[:100])
    paths = {"src": tmp_path / "src.bin", "out": tmp_path / "out", "broken": tmp_path / "broken.safetensors"}
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line: every write to stdout fails with EPIPE
    try:
        result = subprocess.run(
            [sys.executable, "-m", "shardkit", *[part.format(**paths) for part in command]],
            stdout=write,
            stderr=subprocess.PIPE,
            env=child_env(),
            cwd=ROOT,
            text=True,
        )
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (code, "")
    if command[0] == "split":
        assert len(load_any(tmp_path / "out")) == len(lm_state()) - 1
