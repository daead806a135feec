"""Routed expert fetch on a GPU: experts on the CPU tier (pinned host → GPU copies of the chosen experts only) and
on the disk tier, bitwise equal to the all-on-GPU model, with and without the expert cache; generate() agrees."""

from __future__ import annotations

import pytest
import torch

from shardkit import infer_auto_device_map, init_empty_weights, load_checkpoint_and_dispatch

pytestmark = pytest.mark.gpu

LAYERS = 4


def config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_experts=16,
        num_experts_per_tok=4,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=256,
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from safetensors.torch import save_file
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config()).eval().to(torch.bfloat16)
    folder = tmp_path_factory.mktemp("qwen3moe")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    return folder


def build():
    from transformers import Qwen3MoeForCausalLM

    with init_empty_weights():
        return Qwen3MoeForCausalLM(config()).eval().to(torch.bfloat16)


def experts_map(tier):
    return {"": 0, **{f"model.layers.{i}.mlp.experts": tier for i in range(LAYERS)}}


@pytest.fixture(scope="module")
def on_gpu(saved):
    return load_checkpoint_and_dispatch(build(), saved, device_map={"": 0})


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("tier", ["cpu", "disk"])
@pytest.mark.parametrize("cache", [None, "2MB"])
def test_routed_experts_bitwise_on_gpu(saved, on_gpu, tmp_path, tier, cache):
    model = load_checkpoint_and_dispatch(
        build(), saved, device_map=experts_map(tier), offload_folder=tmp_path / "off", expert_cache=cache
    )
    block = model.model.layers[0].mlp.experts._shardkit_hook.block
    assert block.tier == tier and block.experts is not None
    generator = torch.Generator().manual_seed(1)
    for shape in [(1, 1), (1, 1), (1, 2), (4, 256)]:  # decode twice (cache hits), two tokens, a long prefill
        x = torch.randint(0, 256, shape, generator=generator).cuda()
        assert torch.equal(logits(model, x), logits(on_gpu, x)), shape
    stats = block.experts.stats
    if cache:
        # the cache holds every expert after the first forwards: even the prefill's misses stay few, so routed
        assert stats["routed"] == 4 and model._shardkit_streamer.expert_cache.stats()["hits"] > 0, stats
    else:
        assert stats["routed"] == 3 and stats["dense"] == 1, stats


def test_generate_same_tokens_with_routed_experts(saved, on_gpu):
    model = load_checkpoint_and_dispatch(build(), saved, device_map=experts_map("cpu"), expert_cache="4MB")
    prompt = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2)).cuda()
    expected = on_gpu.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=12, do_sample=False), expected)


def test_experts_offload_plan_runs_on_gpu(saved, on_gpu):
    from shardkit.bigmodel.measure import compute_module_sizes

    empty = build()
    sizes = compute_module_sizes(empty)
    block = sizes["model.layers.0.mlp.experts"]
    # room for all but the experts, the two staging slabs and one layer's experts
    budget = {0: sizes[""] - 4 * block + 2 * block + block, "cpu": 10 * sizes[""]}
    device_map = infer_auto_device_map(empty, max_memory=budget, experts_offload=True)
    assert [device_map[f"model.layers.{i}.mlp.experts"] for i in range(LAYERS)] == [0, "cpu", "cpu", "cpu"]
    model = load_checkpoint_and_dispatch(empty, saved, device_map=device_map)
    x = torch.randint(0, 256, (1, 3), generator=torch.Generator().manual_seed(4)).cuda()
    assert torch.equal(logits(model, x), logits(on_gpu, x))
