"""``shardkit convert``: .bin to safetensors keeping the layout, bit-exact round trips, a real model still works."""

from __future__ import annotations

import json
import os

import torch
from builders import minilm_dir, save_bin, save_sharded, tensor_bytes, tied_state_dict, varied_state_dict
from cli_helpers import child_env, folder_digest, load_any, run_shardkit
from safetensors.torch import load_file

import shardkit


def lm_state() -> dict[str, torch.Tensor]:
    state = varied_state_dict()
    state.update(tied_state_dict(2))
    return state


def test_sharded_bin_keeps_layout(tmp_path):
    state = lm_state()
    (tmp_path / "src").mkdir()
    save_sharded(state, tmp_path / "src", 400, safe=False)
    source = json.loads((tmp_path / "src" / "pytorch_model.bin.index.json").read_text())
    result = run_shardkit("convert", tmp_path / "src", tmp_path / "out", "--verify")
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    renamed = {
        name: file.replace("pytorch_model", "model").replace(".bin", ".safetensors")
        for name, file in source["weight_map"].items()
    }
    del renamed["model.embed_tokens.weight"]  # one copy of the tied pair; the other name is recorded as hub does
    assert index["weight_map"] == renamed
    assert index["metadata"] == {"total_size": source["metadata"]["total_size"], "model.embed_tokens.weight": "lm_head.weight"}
    assert sorted(os.listdir(tmp_path / "out")) == sorted(set(renamed.values())) + ["model.safetensors.index.json"]
    loaded = load_any(tmp_path / "out")
    for name, tensor in state.items():
        if name != "model.embed_tokens.weight":
            assert tensor_bytes(loaded[name]) == tensor_bytes(tensor) and loaded[name].dtype == tensor.dtype, name


def test_single_bin_to_single_safetensors(tmp_path):
    state = lm_state()
    save_bin(state, tmp_path / "pytorch_model.bin")
    summary = shardkit.convert(tmp_path / "pytorch_model.bin", tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["model.safetensors"] and summary.index is None
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    assert set(loaded) == set(state) - {"model.embed_tokens.weight"}


def test_max_shard_size_repacks(tmp_path):
    save_bin(lm_state(), tmp_path / "pytorch_model.bin")
    summary = shardkit.convert(tmp_path / "pytorch_model.bin", tmp_path / "out", max_shard_size="1kB")
    assert len(summary.files) == 5 and summary.index == "model.safetensors.index.json"


def test_round_trip_bin_safetensors_bin_is_bit_exact(tmp_path):
    state = lm_state()
    state["nan"] = torch.tensor([float("nan"), -0.0, float("inf")])
    (tmp_path / "src").mkdir()
    save_sharded(state, tmp_path / "src", 300, safe=False)
    shardkit.convert(tmp_path / "src", tmp_path / "st", verify=True)
    shardkit.convert(tmp_path / "st", tmp_path / "bin", format="bin", verify=True)
    shardkit.convert(tmp_path / "bin", tmp_path / "st2", verify=True)
    original, back = load_any(tmp_path / "src"), load_any(tmp_path / "bin")
    assert sorted(back) == sorted(original)
    for name in original:
        assert back[name].dtype == original[name].dtype and back[name].shape == original[name].shape
        assert tensor_bytes(back[name]) == tensor_bytes(original[name]), name
    assert back["lm_head.weight"].data_ptr() == back["model.embed_tokens.weight"].data_ptr()  # real sharing again
    assert json.loads((tmp_path / "bin" / "pytorch_model.bin.index.json").read_text())["weight_map"].keys() == original.keys()
    # the safetensors side is a fixed point: identical shards, the same index (its key order follows the source's)
    first, second = folder_digest(tmp_path / "st"), folder_digest(tmp_path / "st2")
    index = "model.safetensors.index.json"
    assert {k: v for k, v in first.items() if k != index} == {k: v for k, v in second.items() if k != index}
    assert json.loads((tmp_path / "st" / index).read_text()) == json.loads((tmp_path / "st2" / index).read_text())


def test_minilm_through_shards_bin_and_back_gives_identical_outputs(tmp_path):
    """transformers loads the split, the .bin conversion and the conversion back, and computes the same outputs."""
    source = minilm_dir()
    steps = [
        ("split", source, tmp_path / "shards", "--max-shard-size", "20MB"),
        ("convert", tmp_path / "shards", tmp_path / "bin", "--format", "bin"),
        ("convert", tmp_path / "bin", tmp_path / "back"),
    ]
    for command, src, dst, *options in steps:
        result = run_shardkit(command, src, dst, "--verify", "--quiet", *options)
        assert result.returncode == 0, result.stderr
        assert (dst / "config.json").read_bytes() == (source / "config.json").read_bytes()  # carried along
    shards = sorted(p.name for p in (tmp_path / "shards").iterdir() if p.suffix == ".safetensors")
    assert len(shards) == 4  # 90.9 MB in 20 MB shards (the word embeddings alone are 46.9 MB)
    assert sorted(p.name for p in (tmp_path / "bin").iterdir() if p.suffix == ".bin") == [
        name.replace("model", "pytorch_model").replace(".safetensors", ".bin") for name in shards
    ]

    os.environ.update(child_env())  # HF_HUB_OFFLINE for from_pretrained
    from transformers import AutoModel

    inputs = {
        "input_ids": torch.tensor([[101, 7592, 2088, 999, 2023, 2003, 102]]),
        "attention_mask": torch.ones(1, 7, dtype=torch.long),
    }

    def outputs(folder):
        model = AutoModel.from_pretrained(folder).eval()
        with torch.no_grad():
            return model(**inputs).last_hidden_state

    reference = outputs(source)
    for folder in ("shards", "bin", "back"):
        assert torch.equal(outputs(tmp_path / folder), reference), folder
    assert folder_digest(tmp_path / "back") == folder_digest(tmp_path / "shards")
