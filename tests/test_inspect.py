"""``shardkit inspect``: the summary's figures, its JSON form and its human form."""

from __future__ import annotations

import json

from builders import save_bin, save_sharded, tied_state_dict, varied_state_dict
from click.testing import CliRunner

from shardkit.cli import main


def run(*args):
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_json_summary_of_sharded_checkpoint(tmp_path):
    state = varied_state_dict()
    save_sharded(state, tmp_path, max_shard_size=500)
    summary = json.loads(run("inspect", str(tmp_path), "--json"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert summary["format"] == "safetensors" and summary["sharded"]
    assert summary["index"] == "model.safetensors.index.json"
    assert summary["tensors"] == len(state)
    assert summary["params"] == sum(t.numel() for t in state.values())
    assert summary["bytes"] == index["metadata"]["total_size"]
    assert [f["path"] for f in summary["files"]] == sorted(set(index["weight_map"].values()))
    assert sum(f["tensors"] for f in summary["files"]) == len(state)
    assert summary["largest"] == {"name": "layers.0.mlp.up.weight", "dtype": "F64", "shape": [12, 8], "bytes": 768}
    assert summary["dtypes"]["F64"]["bytes"] == 768
    assert abs(sum(row["share"] for row in summary["dtypes"].values()) - 1) < 1e-9
    assert list(summary["dtypes"]) == sorted(summary["dtypes"], key=lambda d: -summary["dtypes"][d]["bytes"])


def test_human_output_lists_aliases_and_skipped(tmp_path):
    path = save_bin({"state_dict": tied_state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    out = run("inspect", str(path))
    lines = out.splitlines()
    assert lines[0].split() == ["source", str(path)]
    assert lines[1].split() == ["format", "torch-zip"]
    assert lines[2].split() == ["tensors", "6", "tensors", "(+1", "alias)"]  # as validate counts them
    assert "aliases (share bytes with)" in out
    assert "  model.embed_tokens.weight -> lm_head.weight" in lines
    assert "  epoch: int beside the 'state_dict' state dict" in lines
    # Aligned: every key column has the same width.
    assert len({line.index(line.split()[1]) for line in lines[:7]}) == 1


def test_tensor_listing(tmp_path):
    path = save_bin(tied_state_dict(), tmp_path / "pytorch_model.bin")
    summary = json.loads(run("inspect", str(path), "--json", "--tensors"))
    rows = {row["name"]: row for row in summary["tensor_list"]}
    assert rows["model.embed_tokens.weight"]["alias_of"] == "lm_head.weight"
    assert rows["model.norm.weight"] == {
        "name": "model.norm.weight",
        "dtype": "F32",
        "shape": [8],
        "bytes": 32,
        "file": "pytorch_model.bin",  # relative to the checkpoint's folder, like "files"
        "alias_of": None,
    }


def test_minilm(minilm):
    summary = json.loads(run("inspect", str(minilm), "--json"))
    assert summary["tensors"] == 104
    assert summary["params"] == 22_713_728
    assert summary["bytes"] == 90_856_960
    assert summary["largest"]["name"] == "embeddings.word_embeddings.weight"
    assert set(summary["dtypes"]) == {"F32", "I64"}
