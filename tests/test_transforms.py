"""Transforms while resharding: key mapping and dtype rules (split and convert, CLI and library)."""

from __future__ import annotations

import json
import re

import orjson
import pytest
import torch
from builders import save_bin, save_safetensors, tied_state_dict
from cli_helpers import load_any, run_shardkit
from safetensors import safe_open

import shardkit
from shardkit.errors import UsageError
from shardkit.write.transforms import TransformWarning


def compiled_state() -> dict[str, torch.Tensor]:
    """A torch.compile'd LM: every name under ``_orig_mod.``, head tied to the embedding."""
    return {f"_orig_mod.{k}": v for k, v in tied_state_dict().items()}


@pytest.fixture
def compiled(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    save_bin(compiled_state(), folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))
    return folder


def test_strip_prefix_and_rename_copy_bytes_and_follow_aliases(tmp_path, compiled):
    dst = tmp_path / "out"
    summary = shardkit.split(
        compiled, dst, max_shard_size=600, strip_prefix="_orig_mod.", rename=[r"layers\.(\d+)\.=h.\1.", "^model\\.=m."]
    )
    assert summary.materialized == 0  # a rename is still a byte-range copy
    state = tied_state_dict()
    expected = {re.sub(r"^model\.", "m.", re.sub(r"layers\.(\d+)\.", r"h.\1.", k)): v for k, v in state.items()}
    loaded = load_any(dst)
    # The head is tied: stored once under the kept name, the other recorded as an alias under its new name.
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    # (the .bin reader keeps the alphabetically first source name, _orig_mod.lm_head.weight)
    assert index["metadata"]["m.embed_tokens.weight"] == "lm_head.weight"
    assert set(index["weight_map"]) == set(expected) - {"m.embed_tokens.weight"}
    assert set(loaded) == set(expected) - {"m.embed_tokens.weight"}
    for name, tensor in loaded.items():
        assert torch.equal(tensor, expected[name]), name
    reread = shardkit.open_checkpoint(dst)
    assert reread["m.embed_tokens.weight"].alias_of == "lm_head.weight"


def test_convert_to_bin_keeps_the_alias_under_new_names(tmp_path, compiled):
    shardkit.convert(compiled, tmp_path / "bin", format="bin", strip_prefix=["_orig_mod."])
    state = torch.load(tmp_path / "bin" / "pytorch_model.bin", weights_only=True)
    assert set(state) == set(tied_state_dict())
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()


def test_select_and_drop(tmp_path, compiled):
    summary = shardkit.split(
        compiled, tmp_path / "out", select=["*layers*", "re:norm"], drop=["re:layers\\.1\\."], strip_prefix="_orig_mod."
    )
    assert {row["to"] for row in summary.mapping} == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.norm.weight",
    }
    # Dropping the embedding keeps the head, which now owns the shared bytes.
    shardkit.split(compiled, tmp_path / "head", drop="*embed_tokens*")
    loaded = load_any(tmp_path / "head")
    assert torch.equal(loaded["_orig_mod.lm_head.weight"], tied_state_dict()["lm_head.weight"])
    assert "_orig_mod.model.embed_tokens.weight" not in loaded


def test_collision_names_both_and_writes_nothing(tmp_path, compiled):
    result = run_shardkit("split", compiled, tmp_path / "out", "--rename", r"layers\.\d+=L")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "'_orig_mod.model.layers.0.self_attn.q_proj.weight'" in result.stderr
    assert "'_orig_mod.model.layers.1.self_attn.q_proj.weight'" in result.stderr
    assert "'_orig_mod.model.L.self_attn.q_proj.weight'" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--select", "re:(unclosed"], "--select 're:(unclosed'"),
        (["--drop", "layers[0"], "--drop 'layers[0'"),
        (["--rename", "no-equals-sign"], "--rename 'no-equals-sign'"),
        (["--rename", "([a-z]=x"], "--rename '([a-z]=x'"),
        (["--rename", r"model=\9"], r"--rename 'model=\\9'"),
        (["--keep-dtype", "*norm*"], "--keep-dtype needs --dtype"),
        (["--select", "nothing-like-this"], "--select/--drop leave no tensor"),
    ],
)
def test_bad_patterns_name_the_option(tmp_path, compiled, args, option):
    result = run_shardkit("split", compiled, tmp_path / "out", *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("shardkit: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert option in result.stderr
    assert not (tmp_path / "out").exists()


def test_rename_matching_nothing_warns(tmp_path, compiled):
    result = run_shardkit("split", compiled, tmp_path / "out", "--rename", "decoder=model", "-q")
    assert result.returncode == 0
    assert "shardkit: warning: --rename 'decoder=model' matched no tensor name" in result.stderr
    with pytest.warns(TransformWarning, match="--strip-prefix 'module.' matched no tensor name"):
        shardkit.split(compiled, tmp_path / "lib", strip_prefix="module.")


def test_dry_run_prints_the_mapping(tmp_path, compiled):
    result = run_shardkit("split", compiled, tmp_path / "out", "--strip-prefix", "_orig_mod.", "--dry-run")
    assert result.returncode == 0
    assert "_orig_mod.model.norm.weight -> model.norm.weight\n" in result.stdout
    assert "_orig_mod.model.embed_tokens.weight -> model.embed_tokens.weight  [alias of lm_head.weight]" in result.stdout
    as_json = run_shardkit("split", compiled, tmp_path / "out", "--strip-prefix", "_orig_mod.", "--dry-run", "--json")
    rows = orjson.loads(as_json.stdout)["mapping"]
    assert {"from": ["_orig_mod.model.norm.weight"], "to": "model.norm.weight", "how": "copy"} in rows
    assert not (tmp_path / "out").exists()


def test_dtype_with_kept_patterns_and_config(tmp_path, compiled):
    dst = tmp_path / "out"
    shardkit.split(compiled, dst, dtype="fp16", keep_dtype=["*norm*", "re:lm_head"], strip_prefix="_orig_mod.")
    with safe_open(dst / "model.safetensors", "pt") as handle:
        dtypes = {k: handle.get_slice(k).get_dtype() for k in handle.keys()}
    assert dtypes["model.norm.weight"] == "F32"
    assert dtypes["model.layers.0.mlp.down_proj.weight"] == "F16"
    # The tied embedding follows its stored tensor (the head, kept).
    assert "model.embed_tokens.weight" not in dtypes and dtypes["lm_head.weight"] == "F32"
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "float16"


def test_dtype_auto_reads_the_config(tmp_path, compiled):
    dst = tmp_path / "out"
    result = run_shardkit("convert", compiled, dst, "--dtype", "auto", "--keep-dtype", "*norm*", "-q")
    assert result.returncode == 0, result.stderr
    loaded = load_any(dst)
    assert loaded["_orig_mod.model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert loaded["_orig_mod.model.norm.weight"].dtype == torch.float32
    expected = compiled_state()["_orig_mod.model.layers.0.mlp.down_proj.weight"].to(torch.bfloat16)
    assert torch.equal(loaded["_orig_mod.model.layers.0.mlp.down_proj.weight"], expected)
    config = json.loads((dst / "config.json").read_text())
    assert config == {"model_type": "llama", "torch_dtype": "bfloat16"}


def test_dtype_auto_without_a_config(tmp_path):
    state = tied_state_dict()
    state["lm_head.weight"] = state["lm_head.weight"].clone()
    save_safetensors(state, tmp_path / "model.safetensors")
    with pytest.raises(UsageError, match="--dtype auto: no config.json beside"):
        shardkit.split(tmp_path / "model.safetensors", tmp_path / "out", dtype="auto")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    result = run_shardkit("split", tmp_path / "model.safetensors", tmp_path / "out", "--dtype", "auto")
    assert result.returncode == 2
    assert "states no dtype" in result.stderr
    assert not (tmp_path / "out").exists()


def test_verify_with_renames_and_casts(tmp_path, compiled):
    summary = shardkit.split(compiled, tmp_path / "out", max_shard_size=500, rename=["^_orig_mod\\.="], dtype="bf16", verify=True)
    assert summary.verified and summary.materialized > 0
    assert len(summary.files) > 1
