"""``--experts packed|per-expert``: byte-path MoE layouts that transformers 5 loads with the same logits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from cli_helpers import ROOT, load_any, run_shardkit
from safetensors.torch import load_file

import shardkit
from shardkit.errors import UsageError
from shardkit.write.moe import FAMILIES, MODEL_TYPES

transformers = pytest.importorskip("transformers")

COMMON = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, vocab_size=64)

#: Tiny random configs, one per architecture family the issue names.
CONFIGS = {
    "qwen2_moe": dict(
        intermediate_size=32,
        moe_intermediate_size=8,
        shared_expert_intermediate_size=8,
        num_experts=4,
        num_experts_per_tok=2,
    ),
    "qwen3_moe": dict(intermediate_size=32, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2, head_dim=8),
    "mixtral": dict(intermediate_size=8, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=8, num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(
        intermediate_size=32,
        moe_intermediate_size=8,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=8,
        kv_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        num_key_value_heads=2,
    ),
}


def tiny_model(model_type: str):
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **CONFIGS[model_type]})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return model


def logits(model) -> torch.Tensor:
    ids = torch.arange(12).reshape(2, 6) % model.config.vocab_size
    with torch.no_grad():
        return model(input_ids=ids).logits


def load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_per_expert_to_packed_and_back(tmp_path, model_type):
    model = tiny_model(model_type)
    expected = logits(model)
    source = tmp_path / "v4"
    model.save_pretrained(source)  # save_original_format: one tensor per expert
    assert any(".experts.0." in k for k in load_file(source / "model.safetensors"))

    packed = tmp_path / "packed"
    summary = shardkit.split(source, packed, max_shard_size="20KB", experts="packed", verify=True)
    assert summary.materialized == 0 and summary.verified and len(summary.files) > 1
    assert (packed / "config.json").is_file()  # split carries the model's other files along
    state = load_any(packed)
    assert not any(".experts.0." in k or "block_sparse_moe" in k for k in state)
    own = model.state_dict()
    for name, tensor in state.items():
        assert torch.equal(tensor, own[name]), name  # exactly the v5 model's own parameters
    assert torch.equal(logits(load(packed)), expected)

    back = tmp_path / "back"
    shardkit.split(packed, back, experts="per-expert")
    original = load_file(source / "model.safetensors")
    again = load_any(back)
    assert set(again) == set(original)
    for name, tensor in again.items():
        assert torch.equal(tensor, original[name]), name
    assert (back / "config.json").is_file()
    assert torch.equal(logits(load(back)), expected)


def test_packed_save_unpacks_like_save_original_format(tmp_path):
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "v5", save_original_format=False)
    model.save_pretrained(tmp_path / "v4")
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(tmp_path / "v5" / "model.safetensors")
    result = run_shardkit("split", tmp_path / "v5", tmp_path / "out", "--experts", "per-expert", "-q")
    assert result.returncode == 0, result.stderr
    out = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert out == (tmp_path / "v4" / "model.safetensors").read_bytes()  # the very bytes transformers writes


def test_packing_needs_no_torch(tmp_path):
    model = tiny_model("qwen2_moe")
    model.save_pretrained(tmp_path / "v4")
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['numpy'] = None\n"
        "from shardkit.cli import main\n"
        f"main({['split', str(tmp_path / 'v4'), str(tmp_path / 'packed'), '--experts', 'packed', '--verify', '-q']!r},"
        " prog_name='shardkit')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    packed = load_file(tmp_path / "packed" / "model.safetensors")
    assert torch.equal(packed["model.layers.1.mlp.experts.down_proj"], model.model.layers[1].mlp.experts.down_proj.data)


def test_our_mappings_are_transformers_own():
    """Each model type we pack maps exactly as transformers 5's conversion mapping says."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming

    for model_type, family_name in MODEL_TYPES.items():
        family = FAMILIES[family_name]
        mapping = get_checkpoint_conversion_mapping(model_type)
        assert mapping is not None, model_type
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        assert len(converters) == 2 and len(renamings) == len(mapping) - 2, model_type
        gate_up, down = converters
        module = "mlp" if family.moe_module == "mlp" else ""
        prefix = f"{module}.experts" if module else ".experts"
        assert [p.replace("\\", "") for p in gate_up.source_patterns] == [
            f"{prefix}.*.{family.gate}.weight",
            f"{prefix}.*.{family.up}.weight",
        ], model_type
        assert gate_up.target_patterns == [f"{prefix}.gate_up_proj"], model_type
        assert [type(op) for op in gate_up.operations] == [MergeModulelist, Concatenate], model_type
        assert gate_up.operations[0].dim == 0 and gate_up.operations[1].dim == 1
        assert down.source_patterns == [f"{prefix}.*.{family.down}.weight"], model_type
        assert down.target_patterns == [f"{prefix}.down_proj"] and [type(op) for op in down.operations] == [MergeModulelist]
        if family.moe_module != "mlp":
            assert [(r.source_patterns, r.target_patterns) for r in renamings] == [([f".{family.moe_module}."], [".mlp."])], (
                model_type
            )
        else:
            assert not renamings, model_type


def test_unknown_architecture_is_named(tmp_path):
    (tmp_path / "src").mkdir()
    torch.save({"a": torch.zeros(2)}, tmp_path / "src" / "pytorch_model.bin")
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"]}))
    result = run_shardkit("split", tmp_path / "src", tmp_path / "out", "--experts", "packed")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "'gpt_oss' (GptOssForCausalLM)" in result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_expert_is_refused(tmp_path):
    model = tiny_model("olmoe")
    state = {k: v for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "v4")
    per_expert = load_file(tmp_path / "v4" / "model.safetensors")
    del per_expert["model.layers.1.mlp.experts.2.up_proj.weight"]
    from safetensors.torch import save_file

    save_file(per_expert, tmp_path / "v4" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UsageError, match=r"model\.layers\.1\.mlp\.experts\.2\.up_proj\.weight is missing"):
        shardkit.split(tmp_path / "v4", tmp_path / "out", experts="packed")
    assert state and not (tmp_path / "out").exists()
