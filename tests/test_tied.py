"""Tied weights: ``validate`` against config.json's tie_word_embeddings, ``--untie`` and ``--tie`` while resharding."""

from __future__ import annotations

import json

import pytest
import torch
from builders import save_bin, save_safetensors, tied_state_dict
from cli_helpers import run_shardkit
from safetensors.torch import load_file

import shardkit


def folder_with(tmp_path, state: dict, config: dict | None, *, name="src", bin_file=False):
    folder = tmp_path / name
    folder.mkdir()
    if bin_file:
        save_bin(state, folder / "pytorch_model.bin")
    else:
        save_safetensors(state, folder / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def untied(state: dict) -> dict:
    return {k: v.clone() for k, v in state.items()}


TIED = {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True}
UNTIED = {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False}


def test_tied_config_with_a_different_head_is_an_error(tmp_path):
    state = untied(tied_state_dict())
    state["lm_head.weight"] = torch.randn(32, 8)
    report = shardkit.validate(folder_with(tmp_path, state, TIED))
    finding = next(f for f in report.findings if f.code == "tied-head-differs")
    assert finding.severity == "error" and finding.tensor == "lm_head.weight"
    assert "model.embed_tokens.weight" in finding.message
    result = run_shardkit("validate", tmp_path / "src")
    assert result.returncode == 1 and "tied-head-differs" in result.stdout


def test_tied_config_with_an_identical_copy_warns(tmp_path):
    report = shardkit.validate(folder_with(tmp_path, untied(tied_state_dict()), TIED))
    assert [(f.code, f.severity) for f in report.findings] == [("tied-head-redundant", "warning")]


@pytest.mark.parametrize("bin_file", [False, True])
def test_tied_config_with_an_alias_is_sound(tmp_path, bin_file):
    state = tied_state_dict()
    if not bin_file:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}  # as save_pretrained writes it
    report = shardkit.validate(folder_with(tmp_path, state, TIED, bin_file=bin_file))
    assert report.ok and not report.findings


def test_untied_config_without_a_head_is_an_error(tmp_path):
    state = {k: v for k, v in tied_state_dict().items() if k != "lm_head.weight"}
    report = shardkit.validate(folder_with(tmp_path, state, UNTIED))
    assert [f.code for f in report.errors] == ["untied-head-missing"]
    # A base model (no LM head in its architecture) has no head to miss.
    report = shardkit.validate(
        folder_with(tmp_path, state, {"architectures": ["LlamaModel"], "tie_word_embeddings": False}, name="base")
    )
    assert report.ok and not report.findings
    # An untied head with its own values is what the config asks for.
    state = untied(tied_state_dict())
    state["lm_head.weight"] = torch.randn(32, 8)
    assert shardkit.validate(folder_with(tmp_path, state, UNTIED, name="own")).ok


def test_untie_writes_a_real_copy_under_every_name(tmp_path):
    src = folder_with(tmp_path, tied_state_dict(), TIED, bin_file=True)
    summary = shardkit.convert(src, tmp_path / "out", untie=True, verify=True)
    assert summary.verified and not summary.dropped and summary.materialized == 0
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(loaded["lm_head.weight"], loaded["model.embed_tokens.weight"])
    assert torch.equal(loaded["lm_head.weight"], tied_state_dict()["lm_head.weight"])
    checkpoint = shardkit.open_checkpoint(tmp_path / "out")
    assert not checkpoint.aliases and checkpoint.total_bytes == sum(
        v.numel() * v.element_size() for v in tied_state_dict().values()
    )


def test_tie_drops_an_identical_copy_only_where_the_config_ties(tmp_path):
    src = folder_with(tmp_path, untied(tied_state_dict()), TIED)
    summary = shardkit.split(src, tmp_path / "out", tie=True, verify=True)
    assert summary.dropped == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in load_file(tmp_path / "out" / "model.safetensors")
    assert shardkit.open_checkpoint(tmp_path / "out")["lm_head.weight"].alias_of == "model.embed_tokens.weight"

    src = folder_with(tmp_path, untied(tied_state_dict()), UNTIED, name="untied")
    result = run_shardkit("split", src, tmp_path / "no", "--tie")
    assert result.returncode == 2 and "does not say tie_word_embeddings: true" in result.stderr
    assert not (tmp_path / "no").exists()

    state = untied(tied_state_dict())
    state["lm_head.weight"] = torch.randn(32, 8)
    src = folder_with(tmp_path, state, TIED, name="different")
    result = run_shardkit("split", src, tmp_path / "no", "--tie")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "lm_head.weight differs from model.embed_tokens.weight" in result.stderr
    assert not (tmp_path / "no").exists()


def test_model_config_ties_are_checked_against_the_bytes(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"],
    )
    model = transformers.LlamaForCausalLM(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = torch.randn_like(state["lm_head.weight"])
    save_safetensors(state, tmp_path / "model.safetensors")
    config.save_pretrained(tmp_path / "config")
    report = shardkit.validate(tmp_path / "model.safetensors", model_config=tmp_path / "config" / "config.json")
    assert [(f.code, f.tensor) for f in report.errors] == [("tied-head-differs", "lm_head.weight")]  # reported once
