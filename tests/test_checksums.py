"""``validate --checksums`` on the byte path: hashlib straight from the file, no torch, the same manifest as before."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from builders import minilm_dir, save_bin, save_sharded, tensor_bytes, varied_state_dict
from cli_helpers import ROOT, child_env

from shardkit import validate

#: validate in a child process; prints whether torch was imported (stderr, last line).
CHILD = """
import sys
from shardkit.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print("TORCH" if "torch" in sys.modules else "NO-TORCH", file=sys.stderr)
"""


def run_validate(*args) -> tuple[subprocess.CompletedProcess, bool]:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, "validate", *map(str, args)], capture_output=True, text=True, env=child_env(), cwd=ROOT
    )
    return result, result.stderr.strip().splitlines()[-1] == "TORCH"


def expected_manifest(state: dict) -> dict:
    """The manifest's contract: per-tensor SHA-256 of the C-order bytes, with dtype and shape, names sorted."""
    names = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16", torch.float64: "F64", torch.int8: "I8"}
    names.update({torch.bool: "BOOL", torch.uint8: "U8", torch.int64: "I64"})
    return {
        name: {"sha256": hashlib.sha256(tensor_bytes(t)).hexdigest(), "dtype": names[t.dtype], "shape": list(t.shape)}
        for name, t in sorted(state.items())
    }


@pytest.mark.parametrize("layout", ["sharded-safetensors", "sharded-bin"])
def test_checksums_never_import_torch_and_write_the_same_manifest(tmp_path, layout):
    state = varied_state_dict()
    folder = save_sharded(state, tmp_path / "ckpt", 300, safe=layout == "sharded-safetensors")
    result, imported = run_validate(folder, "--checksums", tmp_path / "sums.json")
    assert result.returncode == 0, result.stderr
    assert not imported
    manifest = json.loads((tmp_path / "sums.json").read_text())
    assert manifest == {"format": "shardkit-checksums/1", "algorithm": "sha256", "tensors": expected_manifest(state)}
    # the torch path (--deep) computes the very same digests
    report = validate(folder, deep=True, checksums=tmp_path / "sums.json")
    assert report.findings == [] and report.checksums_matched == len(state)


def test_views_and_legacy_files_still_go_through_torch(tmp_path):
    base = torch.arange(40, dtype=torch.float32).reshape(5, 8)
    state = {"view": base[:, 2:5], "t": base.t(), "whole": torch.ones(3)}
    save_bin(state, tmp_path / "pytorch_model.bin")
    torch.save(state, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    for path in (tmp_path / "pytorch_model.bin", tmp_path / "legacy.bin"):
        result, imported = run_validate(path, "--checksums", tmp_path / f"{path.stem}.json")
        assert result.returncode == 0, result.stderr
        assert imported
        assert json.loads((tmp_path / f"{path.stem}.json").read_text())["tensors"] == expected_manifest(state)


def test_a_mismatch_names_the_shard_file_that_holds_the_tensor(tmp_path):
    state = varied_state_dict()
    folder = save_sharded(state, tmp_path / "ckpt", 300)
    manifest = tmp_path / "sums.json"
    assert validate(folder, checksums=manifest).findings == []
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["layers.0.mlp.up.weight"]
    from shardkit import open_checkpoint

    entry = open_checkpoint(folder)["layers.0.mlp.up.weight"]
    with open(folder / shard, "r+b") as handle:
        handle.seek(entry.offset + 5)
        byte = handle.read(1)
        handle.seek(entry.offset + 5)
        handle.write(bytes([byte[0] ^ 0xFF]))
    report = validate(folder, checksums=manifest)
    assert [(f.code, f.file, f.tensor) for f in report.findings] == [("checksum-mismatch", shard, "layers.0.mlp.up.weight")]
    assert str(manifest) in report.findings[0].message
    result, _ = run_validate(folder, "--checksums", manifest)
    assert result.returncode == 1 and f"{shard} [layers.0.mlp.up.weight]" in result.stdout


def test_truncated_file_is_a_short_read_finding(tmp_path):
    state = {"a": torch.ones(1000), "b": torch.ones(1000)}
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "model.safetensors"))
    from shardkit import open_checkpoint
    from shardkit.validation.deep import check_data
    from shardkit.validation.report import Report

    checkpoint = open_checkpoint(tmp_path / "model.safetensors")  # header read, then the file shrinks
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    report = Report(target="x", checkpoint="model.safetensors")
    check_data(checkpoint, report, nan_inf_zero=False, checksums=tmp_path / "sums.json")
    assert [(f.code, f.tensor) for f in report.findings] == [("short-read", "b")]


def test_minilm_checksums_match_torch(tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(minilm_dir() / "model.safetensors"))
    result, imported = run_validate(minilm_dir(), "--checksums", tmp_path / "sums.json")
    assert result.returncode == 0 and not imported, result.stderr
    tensors = json.loads((tmp_path / "sums.json").read_text())["tensors"]
    assert {k: v["sha256"] for k, v in tensors.items()} == {
        k: hashlib.sha256(tensor_bytes(v)).hexdigest() for k, v in state.items()
    }
