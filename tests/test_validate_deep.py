"""``--deep``, ``--checksums`` and ``--model-config``: checks that read tensor data or build the model."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from builders import minilm_dir, save_bin, save_safetensors, save_sharded, tensor_bytes, varied_state_dict

from shardkit import validate
from shardkit.validation import deep


def codes(report):
    return sorted(f.code for f in report.findings)


def test_deep_on_a_sound_checkpoint(tmp_path):
    save_sharded(varied_state_dict(), tmp_path, 300)
    report = validate(tmp_path, deep=True)
    assert report.findings == []


@pytest.mark.parametrize("save", [save_safetensors, save_bin])
def test_nan_inf_and_zero(tmp_path, save):
    state = {
        "ok": torch.randn(4, 4),
        "nan": torch.tensor([1.0, float("nan"), float("nan")], dtype=torch.bfloat16),
        "inf": torch.tensor([float("inf"), 2.0], dtype=torch.float16),
        "zero": torch.zeros(3, 5),
        "int_zero": torch.zeros(4, dtype=torch.int64),  # ids and masks may well be zero: not reported
        "view": torch.arange(20, dtype=torch.float32).reshape(4, 5)[:, 1:3] * float("nan"),
    }
    name = "model.safetensors" if save is save_safetensors else "pytorch_model.bin"
    save({k: v.contiguous() if save is save_safetensors else v for k, v in state.items()}, tmp_path / name)
    report = validate(tmp_path, deep=True)
    found = {(f.code, f.tensor) for f in report.findings}
    assert found == {("nan-values", "nan"), ("inf-values", "inf"), ("all-zero", "zero"), ("nan-values", "view")}
    nan = next(f for f in report.findings if f.tensor == "nan")
    assert nan.message.startswith("2 of 3 values are NaN")


def test_deep_streams_large_tensors_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(deep, "CHUNK", 64)  # many chunks per tensor; the NaN sits in a later one
    values = torch.ones(1000)
    values[977] = float("nan")
    save_safetensors({"w": values}, tmp_path / "model.safetensors")
    report = validate(tmp_path, deep=True)
    assert [(f.code, f.message.split(" values")[0]) for f in report.findings] == [("nan-values", "1 of 1000")]


def test_checksums_written_then_compared(tmp_path):
    state = varied_state_dict()
    save_safetensors(state, tmp_path / "model.safetensors")
    manifest = tmp_path / "sums.json"
    report = validate(tmp_path / "model.safetensors", checksums=manifest)
    assert report.findings == [] and report.checksums_written == str(manifest)
    written = json.loads(manifest.read_text())["tensors"]
    assert written["embed.weight"]["sha256"] == hashlib.sha256(tensor_bytes(state["embed.weight"])).hexdigest()
    again = validate(tmp_path / "model.safetensors", checksums=manifest)
    assert again.findings == [] and again.checksums_matched == len(state) and again.checksums_written is None

    # The same tensors saved as a .bin (different layout, same bytes) match the manifest.
    save_bin(state, tmp_path / "pytorch_model.bin")
    assert validate(tmp_path / "pytorch_model.bin", checksums=manifest).findings == []

    changed = dict(state, **{"scale": torch.tensor(4.0)})
    changed.pop("empty")
    changed["extra"] = torch.ones(2)
    save_safetensors(changed, tmp_path / "model.safetensors")
    report = validate(tmp_path / "model.safetensors", checksums=manifest)
    assert {(f.code, f.tensor) for f in report.findings} == {
        ("checksum-mismatch", "scale"),
        ("checksum-missing", "empty"),
        ("checksum-unlisted", "extra"),
    }


def test_checksums_invalid(tmp_path):
    save_safetensors(varied_state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "sums.json").write_text("[1, 2]")
    assert codes(validate(tmp_path / "model.safetensors", checksums=tmp_path / "sums.json")) == ["checksums-invalid"]


def test_model_config_minilm_is_sound(tmp_path):
    # The real MiniLM checkpoint still holds embeddings.position_ids, a non-persistent buffer now: not unexpected.
    report = validate(minilm_dir(), model_config=True)
    assert report.findings == []


def test_model_config_missing_unexpected_and_mismatched(tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(minilm_dir() / "model.safetensors"))
    state.pop("encoder.layer.0.attention.self.query.weight")
    state["pooler.dense.bias"] = torch.zeros(7)
    state["encoder.layer.9.extra"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(minilm_dir() / "config.json", tmp_path / "config.json")
    report = validate(tmp_path, model_config=True)
    found = {(f.code, f.tensor) for f in report.findings}
    assert ("model-missing-key", "encoder.layer.0.attention.self.query.weight") in found
    assert ("model-shape-mismatch", "pooler.dense.bias") in found
    assert ("model-unexpected-key", "encoder.layer.9.extra") in found
    assert len(found) == 3


def test_model_config_tied_weights(tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        architectures=["LlamaForCausalLM"],
    )
    config.save_pretrained(tmp_path)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_safetensors(state, tmp_path / "model.safetensors")
    assert validate(tmp_path, model_config=tmp_path / "config.json").findings == []

    # Untied, the head is a parameter of its own: leaving it out is an error.
    config.tie_word_embeddings = False
    config.save_pretrained(tmp_path)
    report = validate(tmp_path, model_config=True)
    assert {(f.code, f.tensor) for f in report.findings} == {("model-missing-key", "lm_head.weight")}


def test_model_config_unbuildable(tmp_path):
    save_safetensors(varied_state_dict(), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    assert codes(validate(tmp_path, model_config=True)) == ["model-not-checked"]
    (tmp_path / "config.json").unlink()
    assert codes(validate(tmp_path, model_config=True)) == ["model-not-checked"]


def test_cli_model_config_flag_alone(tmp_path):
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from shardkit.cli import main

    state = load_file(str(minilm_dir() / "model.safetensors"))
    state.pop("pooler.dense.weight")
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(minilm_dir() / "config.json", tmp_path / "config.json")
    result = CliRunner().invoke(main, ["validate", str(tmp_path), "--model-config", "--json"])
    assert result.exit_code == 1
    assert [(f["code"], f["tensor"]) for f in json.loads(result.output)["findings"]] == [
        ("model-missing-key", "pooler.dense.weight")
    ]
    explicit = CliRunner().invoke(main, ["validate", "--model-config", str(tmp_path / "config.json"), str(tmp_path)])
    assert explicit.exit_code == 1 and "model-missing-key" in explicit.output


def test_deep_on_minilm_finds_its_untrained_pooler_bias():
    """The real MiniLM checkpoint ships an all-zero pooler bias (sentence-transformers never trains the pooler)."""
    from safetensors.torch import load_file

    state = load_file(str(minilm_dir() / "model.safetensors"))
    zero = sorted(name for name, t in state.items() if t.is_floating_point() and not t.count_nonzero())
    report = validate(minilm_dir(), deep=True)
    assert (
        [(f.code, f.tensor) for f in report.findings]
        == [("all-zero", name) for name in zero]
        == [("all-zero", "pooler.dense.bias")]
    )
