"""GPU path of the dispatcher: bitwise equality of offloaded forwards with the all-on-GPU model, bounded
streaming memory, pinned CPU tier, loads straight to the GPU, two GPUs in sequence, and OOM handling."""

from __future__ import annotations

import pytest
import torch
from bigmodels import build, inputs, run, save

from shardkit import init_empty_weights, load_checkpoint_and_dispatch

pytestmark = pytest.mark.gpu


def llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config()).eval().to(torch.bfloat16)
    folder = save(model, tmp_path_factory.mktemp("llama"), shard="1MB")
    return folder


def empty():
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        return LlamaForCausalLM(llama_config()).eval().to(torch.bfloat16)


def ids(batch=2, tokens=16):
    return torch.randint(1, 512, (batch, tokens), generator=torch.Generator().manual_seed(3))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.fixture(scope="module")
def on_gpu(saved):
    model = load_checkpoint_and_dispatch(empty(), saved, device_map={"": 0})
    assert model.lm_head.weight.device.type == "cuda"
    return model


def tier_map(tier):
    device_map = {"model.embed_tokens": 0, "model.norm": 0, "model.rotary_emb": 0, "lm_head": tier}
    device_map.update({f"model.layers.{i}": tier for i in range(6)})
    return device_map


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_offloaded_forward_is_bitwise_equal_to_all_on_gpu(saved, on_gpu, tier, tmp_path):
    x = ids()
    want = logits(on_gpu, x.cuda())
    model = load_checkpoint_and_dispatch(empty(), saved, device_map=tier_map(tier), offload_folder=tmp_path)
    for _ in range(3):  # first forward learns the order; later ones run fully prefetched
        got = logits(model, x)
        assert got.device.type == "cpu"  # outputs come back where the inputs were
        assert torch.equal(got, want.cpu())
    got = logits(model, x.cuda())
    assert got.device.type == "cuda" and torch.equal(got, want)


def test_cpu_tier_is_pinned_once_and_gpu_memory_is_two_blocks(saved):
    model = load_checkpoint_and_dispatch(empty(), saved, device_map=tier_map("cpu"))
    streamer = model._shardkit_streamer
    layer = model.model.layers[0]
    assert layer.mlp.up_proj.weight.device.type == "cpu" and layer.mlp.up_proj.weight.is_pinned()
    slab_bytes = sum(s.numel() for s in streamer.slabs)
    block = max(sum(p.numel() * p.element_size() for p in m.parameters()) for m in [*model.model.layers, model.lm_head])
    assert slab_bytes <= 2 * (block + 256 * 16)
    x = ids().cuda()
    logits(model, x)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    logits(model, x)
    torch.cuda.synchronize()
    # nothing allocated for weights in the hot path: only activations on top of the preallocated slabs
    assert torch.cuda.max_memory_allocated() - before < block


def test_load_straight_to_gpu_with_cast(saved, on_gpu):
    model = load_checkpoint_and_dispatch(empty().float(), saved, device_map={"": 0}, dtype=torch.float32)
    assert model.lm_head.weight.dtype == torch.float32 and model.lm_head.weight.is_cuda
    assert torch.equal(model.lm_head.weight, on_gpu.lm_head.weight.float())


def test_auto_map_under_a_gpu_cap_is_bitwise_equal(saved, on_gpu, tmp_path):
    x = ids()
    want = logits(on_gpu, x.cuda()).cpu()
    total = sum(p.numel() * 2 for p in empty().parameters())
    model = load_checkpoint_and_dispatch(
        empty(), saved, device_map="auto", max_memory={0: total // 2, "cpu": total // 2}, offload_folder=tmp_path
    )
    assert {0, "cpu", "disk"} <= set(model.hf_device_map.values())
    assert torch.equal(logits(model, x), want)


def test_out_of_memory_names_the_block_and_the_model_stays_usable(saved):
    from shardkit.bigmodel import OutOfMemoryError

    model = load_checkpoint_and_dispatch(empty(), saved, device_map=tier_map("cpu"))
    small = ids()
    want = logits(model, small)
    free = torch.cuda.mem_get_info()[0]
    hog = torch.empty(max(free - 64 * 2**20, 0), dtype=torch.uint8, device="cuda")  # leave ~64 MiB
    try:
        with pytest.raises(OutOfMemoryError, match="smaller max_memory"):
            logits(model, ids(batch=64, tokens=2048))
    finally:
        del hog
        torch.cuda.empty_cache()
    assert torch.equal(logits(model, small), want)


@pytest.mark.multigpu
def test_balanced_over_two_gpus_plus_cpu_equals_one_gpu(saved, on_gpu):
    x = ids()
    want = logits(on_gpu, x.cuda()).cpu()
    total = sum(p.numel() * 2 for p in empty().parameters())
    max_memory = {0: total // 2, 1: total // 2, "cpu": total}  # each GPU: two staging slabs and a few layers
    model = load_checkpoint_and_dispatch(empty(), saved, device_map="balanced", max_memory=max_memory)
    assert {0, 1, "cpu"} <= set(model.hf_device_map.values())
    assert torch.equal(logits(model, x), want)


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_tied_head_and_embedding_offloaded_on_gpu(tier, tmp_path):
    """GPT-2's LM head is its token embedding: both offloaded, each block stages its own view of the tensor."""
    reference = build("gpt2")
    folder = save(reference, tmp_path / "ckpt")
    with torch.no_grad():
        want = reference.cuda()(**{k: v.cuda() for k, v in inputs("gpt2").items()}).logits.cpu()
    device_map = {
        "transformer.wte": tier,
        "transformer.wpe": 0,
        "transformer.drop": 0,
        "transformer.h": tier,
        "transformer.ln_f": 0,
        "lm_head": tier,
    }
    model = load_checkpoint_and_dispatch(
        build("gpt2", empty=True), folder, device_map=device_map, offload_folder=tmp_path / "off"
    )
    assert torch.equal(run(model, "gpt2"), want)
