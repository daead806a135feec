"""``--dequantize``: block-FP8 and scaled FP8 weights to bf16/fp16/fp32, bit-equal to torch's float32 formula."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cli_helpers import folder_digest, load_any, run_shardkit
from safetensors.torch import save_file

import shardkit
from shardkit.write import fp8 as fp8_module

FP8_MAX = 448.0


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int], fmt=torch.float8_e4m3fn):
    """DeepSeek-V3's quantization: per (b0, b1) tile, s = amax / 448, q = w / s (ragged edge tiles included)."""
    rows, cols = weight.shape[-2:]
    srows, scols = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    scale = torch.empty(*weight.shape[:-2], srows, scols)
    q = torch.empty_like(weight)
    for i in range(srows):
        for j in range(scols):
            tile = weight[..., i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            s = tile.abs().amax(dim=(-2, -1)).clamp(min=1e-12) / FP8_MAX
            scale[..., i, j] = s
            q[..., i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]] = tile / s[..., None, None]
    return q.to(fmt), scale


def reference(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype) -> torch.Tensor:
    """The formula in float32 with torch, whole tensor at once: fp32(q) * s[i // b0, j // b1], then the cast."""
    rows, cols = q.shape[-2:]
    expanded = scale.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
    expanded = expanded.repeat_interleave(block[1], dim=-1)[..., :cols]
    return (q.float() * expanded).to(dtype)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


@pytest.fixture
def deepseek(tmp_path):
    """A DeepSeek-V3-style block-FP8 checkpoint: ragged shapes, a 3-D expert tensor, per-tensor and per-channel
    scales, an activation scale, and BF16 tensors that must pass through untouched, in two shards."""
    g = torch.Generator().manual_seed(0)
    block = (128, 128)
    tensors, expected = {}, {}

    def block_fp8(name, shape, fmt=torch.float8_e4m3fn):
        q, s = quantize_blocks(torch.randn(*shape, generator=g) * 3, block, fmt)
        tensors[name], tensors[name + "_scale_inv"] = q, s
        expected[name] = (q, s, block)

    block_fp8("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", (576, 300))  # scale [5, 3]
    block_fp8("model.layers.0.mlp.down_proj.weight", (128, 256), torch.float8_e5m2)
    block_fp8("model.layers.0.mlp.experts.gate_up_proj", (3, 200, 130))  # packed experts [E, 2I, H]
    w = torch.randn(40, 24, generator=g)
    s = w.abs().amax() / FP8_MAX
    tensors["model.layers.1.o_proj.weight"], tensors["model.layers.1.o_proj.weight_scale"] = (w / s).to(torch.float8_e4m3fn), s
    tensors["model.layers.1.o_proj.input_scale"] = torch.tensor(0.5)
    expected["model.layers.1.o_proj.weight"] = (tensors["model.layers.1.o_proj.weight"], s.reshape(1, 1), (40, 24))
    w = torch.randn(40, 24, generator=g)
    s = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
    tensors["model.layers.1.q_proj.weight"], tensors["model.layers.1.q_proj.weight_scale"] = (w / s).to(torch.float8_e4m3fn), s
    expected["model.layers.1.q_proj.weight"] = (tensors["model.layers.1.q_proj.weight"], s, (1, 24))
    plain = {
        "model.embed_tokens.weight": torch.randn(64, 24, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.ones(24),
    }
    tensors.update(plain)
    folder = tmp_path / "fp8"
    folder.mkdir()
    names = sorted(tensors)
    halves = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for file, keys in halves.items():
        save_file({k: tensors[k].contiguous() for k in keys}, folder / file, metadata={"format": "pt"})
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "model_type": "deepseek_v3",
        "torch_dtype": "bfloat16",
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [128, 128],
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder, expected, plain


@pytest.mark.parametrize(("option", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_dequantize_equals_the_float32_reference(tmp_path, deepseek, option, dtype, monkeypatch):
    folder, expected, plain = deepseek
    monkeypatch.setattr(fp8_module, "CHUNK_BYTES", 7 * 130 * 4)  # several chunks per weight, not block-aligned
    dst = tmp_path / "out"
    summary = shardkit.split(folder, dst, max_shard_size="100KB", dequantize=option, verify=True)
    assert summary.verified
    loaded = load_any(dst)
    assert set(loaded) == set(expected) | set(plain)  # scales and the activation scale are gone
    for name, (q, scale, block) in expected.items():
        assert loaded[name].dtype == dtype
        assert torch.equal(bits(loaded[name]), bits(reference(q, scale, block, dtype))), name
    for name, tensor in plain.items():
        assert torch.equal(bits(loaded[name]), bits(tensor)), name  # copied as they are
    config = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["torch_dtype"] == {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[option]
    rows = {row["to"]: row for row in summary.mapping}
    assert rows["model.layers.0.mlp.down_proj.weight"]["from"] == [
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.mlp.down_proj.weight_scale_inv",
    ]


def test_block_size_comes_from_the_config(tmp_path):
    g = torch.Generator().manual_seed(1)
    q, s = quantize_blocks(torch.randn(100, 70, generator=g), (64, 32))
    (tmp_path / "src").mkdir()
    save_file({"w.weight": q, "w.weight_scale_inv": s}, tmp_path / "src" / "model.safetensors")
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 32]}, "torch_dtype": "bfloat16"}
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    result = run_shardkit("convert", tmp_path / "src", tmp_path / "out", "--dequantize", "bf16", "--verify", "-q")
    assert result.returncode == 0, result.stderr
    out = load_any(tmp_path / "out")
    assert torch.equal(bits(out["w.weight"]), bits(reference(q, s, (64, 32), torch.bfloat16)))
    # Against the default 128x128 blocks, the same scale [2, 3] has the wrong shape: both tensors are named.
    (tmp_path / "src" / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    result = run_shardkit("convert", tmp_path / "src", tmp_path / "bad", "--dequantize", "bf16")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "scale w.weight_scale_inv is [2, 3], but weight w.weight [100, 70] with 128x128 blocks needs [1, 1]" in result.stderr
    assert not (tmp_path / "bad").exists()


def test_no_fp8_says_so(tmp_path):
    save_file({"a": torch.zeros(3)}, tmp_path / "model.safetensors")
    before = folder_digest(tmp_path)
    result = run_shardkit("split", tmp_path / "model.safetensors", tmp_path / "out", "--dequantize", "bf16")
    assert result.returncode == 2
    assert "holds no FP8 tensors" in result.stderr and result.stderr.count("\n") == 1
    assert folder_digest(tmp_path) == before and not (tmp_path / "out").exists()


def test_per_channel_scale_of_the_wrong_shape(tmp_path):
    q = torch.randn(8, 4).to(torch.float8_e4m3fn)
    save_file({"l.weight": q, "l.weight_scale": torch.ones(4, 1)}, tmp_path / "model.safetensors")
    result = run_shardkit("split", tmp_path / "model.safetensors", tmp_path / "out", "--dequantize", "fp32")
    assert result.returncode == 2
    assert "scale l.weight_scale is [4, 1], but weight l.weight [8, 4]" in result.stderr


def test_dequantize_memory_is_a_chunk_not_the_model(tmp_path):
    """Twelve 2048x2048 FP8 weights (96 MiB of bf16 output): peak RSS grows by about one chunk's work, not the model."""
    import subprocess
    import sys

    from cli_helpers import ROOT, child_env

    g = torch.Generator().manual_seed(2)
    tensors = {}
    for i in range(12):
        q, s = torch.randn(2048, 2048, generator=g).to(torch.float8_e4m3fn), torch.rand(16, 16, generator=g)
        tensors[f"l{i}.weight"], tensors[f"l{i}.weight_scale_inv"] = q, s
    (tmp_path / "src").mkdir()
    save_file(tensors, tmp_path / "src" / "model.safetensors")
    # VmHWM, not ru_maxrss: a child forked from this (large) process inherits the parent's ru_maxrss at exec.
    code = (
        "import os, torch, shardkit\n"
        "from shardkit.write import files, fp8\n"
        "torch.ones(1).to(torch.bfloat16)\n"
        "def status(key):\n"
        "    line = next(l for l in open('/proc/self/status') if l.startswith(key + ':'))\n"
        "    return int(line.split()[1]) * 1024\n"
        "base = status('VmRSS')\n"
        f"shardkit.split({str(tmp_path / 'src')!r}, {str(tmp_path / 'out')!r}, dequantize='bf16')\n"
        "print(status('VmHWM') - base)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    grown = int(result.stdout.split()[-1])
    largest_f32 = 2048 * 2048 * 4
    assert grown < 2.5 * largest_f32, grown  # the output is 96 MiB; one weight in float32 is 16 MiB


def test_dequantize_then_pack_experts(tmp_path):
    """--dequantize and --experts compose: FP8 per-expert weights become packed bf16 experts, equal to stacking the
    reference-dequantized experts; --select and --rename apply in between."""
    g = torch.Generator().manual_seed(3)
    block = (128, 128)
    tensors, reference_of = {}, {}
    for e in range(3):
        for proj, shape in (("gate_proj", (16, 24)), ("up_proj", (16, 24)), ("down_proj", (24, 16))):
            name = f"_orig_mod.model.layers.0.mlp.experts.{e}.{proj}.weight"
            q, s = quantize_blocks(torch.randn(*shape, generator=g), block)
            tensors[name], tensors[name + "_scale_inv"] = q, s
            reference_of[(e, proj)] = reference(q, s, block, torch.bfloat16)
    tensors["_orig_mod.model.layers.0.mlp.gate.weight"] = torch.randn(3, 24, generator=g)
    tensors["_orig_mod.model.layers.0.extra"] = torch.zeros(2)
    (tmp_path / "src").mkdir()
    save_file(tensors, tmp_path / "src" / "model.safetensors")
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "torch_dtype": "bfloat16"}))
    summary = shardkit.split(
        tmp_path / "src",
        tmp_path / "out",
        dequantize="bf16",
        drop="*.extra",
        strip_prefix="_orig_mod.",
        experts="packed",
        keep_dtype="*.mlp.gate.weight",
        dtype="auto",
        verify=True,
    )
    assert summary.verified
    out = load_any(tmp_path / "out")
    assert set(out) == {
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.experts.down_proj",
        "model.layers.0.mlp.gate.weight",
    }
    gate_up = torch.stack([torch.cat([reference_of[(e, "gate_proj")], reference_of[(e, "up_proj")]]) for e in range(3)])
    down = torch.stack([reference_of[(e, "down_proj")] for e in range(3)])
    assert torch.equal(bits(out["model.layers.0.mlp.experts.gate_up_proj"]), bits(gate_up))
    assert torch.equal(bits(out["model.layers.0.mlp.experts.down_proj"]), bits(down))
    assert out["model.layers.0.mlp.gate.weight"].dtype == torch.float32  # kept
