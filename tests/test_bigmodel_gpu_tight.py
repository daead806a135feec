"""GPU checks of issue 11 items 4, 5 and 7: the disk tier's fixed pinned ring, coarse offloaded entries streamed
per layer, CPU/disk maps that never initialise CUDA on a GPU machine, and from_pretrained onto a GPU.

Run on a GPU machine: ``PYTHONPATH=$PWD python -m pytest -q -m gpu tests/test_bigmodel_gpu_tight.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bigmodels import save

from shardkit import init_empty_weights, load_checkpoint_and_dispatch

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parent.parent


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
    return save(model, tmp_path_factory.mktemp("llama"), shard="1MB")


def empty():
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        return LlamaForCausalLM(llama_config()).eval().to(torch.bfloat16)


def logits(model):
    x = torch.randint(
        1, 512, (2, 16), generator=torch.Generator().manual_seed(3)
    ).cuda()  # a model all on GPU 0 has no hook to move it
    with torch.no_grad():
        return model(input_ids=x).logits.cpu()


@pytest.fixture(scope="module")
def want(saved):
    return logits(load_checkpoint_and_dispatch(empty(), saved, device_map={"": 0}))


@pytest.mark.parametrize("piece", [None, 4096])
def test_disk_blocks_reach_the_gpu_through_the_fixed_ring_bit_for_bit(saved, want, tmp_path, monkeypatch, piece):
    """Every layer on disk, the rest on GPU 0: logits equal the all-GPU model's; the host ring is the fixed
    disk_ring size, not two blocks (with ``piece`` forced small, each block crosses the ring many times)."""
    from shardkit.bigmodel import hooks
    from shardkit.bigmodel.readahead import disk_ring

    if piece is not None:
        monkeypatch.setattr(hooks, "disk_ring", lambda largest: (piece, 3))
    device_map = {"model.embed_tokens": 0, "model.layers": "disk", "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    model = load_checkpoint_and_dispatch(empty(), saved, device_map=device_map, offload_folder=tmp_path)
    streamer = model._shardkit_streamer
    largest = max(b.nbytes for b in streamer.blocks if b.tier == "disk")
    size, count = (piece, 3) if piece is not None else disk_ring(largest)
    assert len(streamer.pieces) == count and all(p.numel() == size for p in streamer.pieces)
    assert sum(1 for b in streamer.blocks if b.tier == "disk") == 6  # one block per layer
    assert torch.equal(logits(model), want)
    assert torch.equal(logits(model), want)


def test_a_whole_model_entry_on_the_cpu_tier_is_streamed_per_layer(saved, want):
    model = load_checkpoint_and_dispatch(empty(), saved, device_map={"model": "cpu", "lm_head": 0})
    streamer = model._shardkit_streamer
    names = sorted(b.name for b in streamer.blocks)
    assert [n for n in names if n.startswith("model.layers.")] == [f"model.layers.{i}" for i in range(6)]
    assert max(s.numel() for s in streamer.slabs) < sum(b.nbytes for b in streamer.blocks) / 3
    assert torch.equal(logits(model), want)


SCRIPT = r"""
import json, sys
import torch
from shardkit import init_empty_weights, load_checkpoint_and_dispatch
sys.path.insert(0, "tests")
from test_bigmodel_gpu_tight import empty
folder, mode, offload = sys.argv[1:4]
device_map = {"cpu": {"": "cpu"}, "disk": {"": "disk"}}[mode]
model = load_checkpoint_and_dispatch(empty(), folder, device_map=device_map, offload_folder=offload, force_hooks=True)
with torch.no_grad():
    model(input_ids=torch.ones(1, 4, dtype=torch.long))
print(json.dumps({"initialized": torch.cuda.is_initialized()}))
"""


@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_a_map_without_gpus_never_initialises_cuda(saved, tmp_path, mode):
    """On a GPU machine, a CPU or disk map creates no CUDA context (it cost ~100 MB of host memory per load)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(saved), mode, str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"initialized": False}


def test_from_pretrained_onto_the_gpu_equals_transformers(saved, want, tmp_path):
    """Weights bit for bit those transformers loads; logits bit for bit the all-GPU load's (and close to
    transformers', whose non-persistent rotary buffer may be computed on another device)."""
    from transformers import LlamaForCausalLM

    import shardkit

    device_map = {"model.embed_tokens": 0, "model.layers": "cpu", "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    theirs = LlamaForCausalLM.from_pretrained(saved, dtype=torch.bfloat16, device_map={"": 0}).eval()
    ours = shardkit.from_pretrained(saved, device_map=device_map, dtype="bf16", offload_folder=tmp_path)
    mine = dict(ours.named_parameters())
    for name, param in theirs.named_parameters():
        assert torch.equal(mine[name].cpu(), param.cpu()), name
    got = logits(ours)
    assert torch.equal(got, want)
    torch.testing.assert_close(got, logits(theirs))
