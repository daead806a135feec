"""``shardkit.from_pretrained``: the model transformers' ``from_pretrained`` gives, built from the config with the
architecture's own class on meta and loaded by shardkit; a Hub id downloads only the config and the checkpoint."""

from __future__ import annotations

import warnings

import pytest
import torch
from bigmodels import configs, run

import shardkit

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _state(model) -> dict:
    return {k: v for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama saved by transformers from its config (seeded weights, 20 KB shards)."""
    import transformers

    cls_name, config = configs()["llama"]
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config).eval()
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder, max_shard_size="20KB")
    return folder


def test_minilm_equals_transformers_bit_for_bit(minilm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel

    theirs = AutoModel.from_pretrained(minilm).eval()
    ours = shardkit.from_pretrained(minilm, device_map={"": "cpu"})
    assert type(ours) is type(theirs) and not ours.training
    assert ours.dtype == theirs.dtype == torch.float32
    want, got = _state(theirs), _state(ours)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want)
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).last_hidden_state, theirs(input_ids=ids).last_hidden_state)


@pytest.mark.parametrize(
    "device_map",
    [
        {"": "cpu"},
        {"": "disk"},
        {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"},
    ],
    ids=["cpu", "disk", "mixed"],
)
def test_tiny_llama_equals_transformers(llama_dir, tmp_path, device_map):
    from transformers import LlamaForCausalLM

    theirs = LlamaForCausalLM.from_pretrained(llama_dir, device_map={"": "cpu"}).eval()
    ours = shardkit.from_pretrained(llama_dir, device_map=device_map, offload_folder=tmp_path)
    assert isinstance(ours, LlamaForCausalLM) and ours.hf_device_map == device_map
    assert torch.equal(run(ours, "llama"), run(theirs, "llama"))
    assert torch.equal(run(ours, "llama"), run(theirs, "llama"))


def test_auto_map_with_a_budget_and_a_dtype(llama_dir, tmp_path):
    from transformers import LlamaForCausalLM

    theirs = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).eval()
    total = sum(p.numel() * 2 for p in theirs.parameters())
    ours = shardkit.from_pretrained(llama_dir, max_memory={"cpu": total // 2}, dtype="bf16", offload_folder=tmp_path)
    assert {"cpu", "disk"} <= set(ours.hf_device_map.values())
    assert next(ours.parameters()).dtype == torch.bfloat16
    assert torch.equal(run(ours, "llama"), run(theirs, "llama"))


def test_a_folder_without_config_is_a_one_line_error(tmp_path):
    from builders import save_safetensors

    save_safetensors({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(shardkit.CheckpointError, match="holds no config.json") as caught:
        shardkit.from_pretrained(tmp_path)
    assert caught.value.code == "no-config" and "\n" not in str(caught.value)


def test_hub_id_downloads_only_config_and_checkpoint_cache_first(llama_dir, tmp_path, monkeypatch):
    from hubserver import HubServer, isolate

    repo = tmp_path / "repo"
    repo.mkdir()
    for path in llama_dir.iterdir():
        (repo / path.name).write_bytes(path.read_bytes())
    (repo / "README.md").write_text("# tiny llama\n")
    (repo / "pytorch_model.bin").write_bytes(b"not needed")
    (repo / "tokenizer.json").write_text("{}")
    server = HubServer()
    try:
        isolate(monkeypatch, tmp_path, server.start())
        server.add_folder("org/tiny-llama", repo)
        model = shardkit.from_pretrained("org/tiny-llama", device_map={"": "cpu"})
        fetched = {r.split(" ")[1].rsplit("/", 1)[-1] for r in server.requests if r.startswith("GET /cdn/")}
        assert fetched == {p.name for p in llama_dir.iterdir() if p.name == "config.json" or p.name.startswith("model")}
        from transformers import LlamaForCausalLM

        theirs = LlamaForCausalLM.from_pretrained(llama_dir).eval()
        assert torch.equal(run(model, "llama"), run(theirs, "llama"))
        before = len(server.requests)
        shardkit.from_pretrained("org/tiny-llama", device_map={"": "cpu"})
        assert not any(r.startswith("GET /cdn/") for r in server.requests[before:])  # the cache answers
    finally:
        server.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        offline = shardkit.from_pretrained("org/tiny-llama", device_map={"": "cpu"})
    assert torch.equal(run(offline, "llama"), run(theirs, "llama"))
