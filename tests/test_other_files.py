"""split/convert of a folder or Hub repo put the model's other files into DST, so that from_pretrained(DST) works."""

from __future__ import annotations

import json
import os

import pytest
import torch
from builders import minilm_dir, save_bin, save_sharded, tied_state_dict
from cli_helpers import run_shardkit
from test_validate_hub import hub  # noqa: F401  (the fixture: a Hub look-alike on 127.0.0.1)

import shardkit
from shardkit.write.other_files import find_other_files

CHECKPOINT_FILES = {"model.safetensors", "model.safetensors.index.json"}


def minilm_copy(tmp_path):
    """MiniLM's folder, copied (so that hard links into it are possible on the test's file system)."""
    import shutil

    folder = tmp_path / "minilm"
    shutil.copytree(minilm_dir(), folder)
    return folder


def test_minilm_split_loads_with_from_pretrained(tmp_path):
    from transformers import AutoModel, AutoTokenizer

    out = tmp_path / "out"
    result = run_shardkit("split", minilm_dir(), out, "--max-shard-size", "30MB")
    assert result.returncode == 0, result.stderr
    assert "+ 11 other files of the model: 1_Pooling/config.json, README.md" in result.stdout
    for name in ("config.json", "tokenizer.json", "vocab.txt", "README.md", "modules.json", "1_Pooling/config.json"):
        assert (out / name).read_bytes() == (minilm_dir() / name).read_bytes(), name
    assert not (out / ".gitattributes").exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = tokenizer(["a tiny sentence", "another one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        got = AutoModel.from_pretrained(out)(**inputs).last_hidden_state
        want = AutoModel.from_pretrained(minilm_dir())(**inputs).last_hidden_state
    assert torch.equal(got, want)


def test_weights_only_writes_the_checkpoint_alone(tmp_path):
    out = tmp_path / "out"
    result = run_shardkit("split", minilm_dir(), out, "--max-shard-size", "30MB", "--weights-only")
    assert result.returncode == 0, result.stderr
    names = {p.name for p in out.iterdir()}
    assert all(n.startswith("model") for n in names) and "model.safetensors.index.json" in names
    summary = shardkit.split(minilm_dir(), tmp_path / "lib", weights_only=True)
    assert summary.other_files == [] and sorted(os.listdir(tmp_path / "lib")) == ["model.safetensors"]


def test_other_files_are_hard_linked_where_possible(tmp_path):
    source = minilm_copy(tmp_path)
    summary = shardkit.convert(source, tmp_path / "out", format="bin")
    assert "config.json" in summary.other_files and "1_Pooling/config.json" in summary.other_files
    assert (tmp_path / "out" / "config.json").stat().st_ino == (source / "config.json").stat().st_ino
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".bin") == ["pytorch_model.bin"]


def test_what_counts_as_other_files(tmp_path):
    folder = tmp_path / "src"
    save_sharded(tied_state_dict(), folder, 400)
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "README.md",
        "LICENSE",
        "chat_template.jinja",
        "sub/preprocessor_config.json",
    ):
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(name)
    for name in (
        ".gitattributes",
        ".cache/huggingface/download/x.lock",
        "pytorch_model.bin",
        "tf_model.h5",
        "flax_model.msgpack",
        "onnx/model.onnx",
        "training_args.bin",
        "optimizer.pt",
        "model.fp16.safetensors",
        "pytorch_model.bin.index.json",
    ):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("weights")
    assert find_other_files(folder) == sorted(
        [
            "LICENSE",
            "README.md",
            "chat_template.jinja",
            "config.json",
            "generation_config.json",
            "special_tokens_map.json",
            "sub/preprocessor_config.json",
            "tokenizer.model",
        ]
    )


def test_dry_run_lists_them_and_a_single_file_has_none(tmp_path):
    summary = shardkit.split(minilm_dir(), tmp_path / "out", dry_run=True)
    assert "tokenizer.json" in summary.other_files and not (tmp_path / "out").exists()
    assert shardkit.split(minilm_dir() / "model.safetensors", tmp_path / "one", dry_run=True).other_files == []
    save_sharded(tied_state_dict(), tmp_path / "sharded", 400)
    (tmp_path / "sharded" / "config.json").write_text("{}")
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    assert shardkit.split(index, tmp_path / "x", dry_run=True).other_files == ["config.json"]


def test_overwrite_takes_the_new_models_files_and_keeps_the_rest(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    save_bin(tied_state_dict(), source / "pytorch_model.bin")
    (source / "config.json").write_text('{"new": true}')
    out = tmp_path / "out"
    shardkit.split(source / "pytorch_model.bin", out)
    (out / "config.json").write_text('{"old": true}')
    (out / "notes.txt").write_text("mine")
    shardkit.convert(source, out, overwrite=True)
    assert (out / "config.json").read_text() == '{"new": true}' and (out / "notes.txt").read_text() == "mine"
    assert (source / "config.json").read_text() == '{"new": true}'


def test_a_rewritten_config_never_writes_through_the_link_into_the_source(tmp_path):
    source = minilm_copy(tmp_path)
    before = (source / "config.json").read_bytes()
    shardkit.split(source, tmp_path / "out", dtype="fp16")  # a cast rewrites the copied config.json's dtype
    assert (source / "config.json").read_bytes() == before
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "bert" and "float16" in (config.get("dtype"), config.get("torch_dtype"))


@pytest.mark.parametrize("weights_only", [False, True])
def test_hub_repo_source_fetches_the_small_files_too(hub, tmp_path, weights_only):  # noqa: F811
    from click.testing import CliRunner

    from shardkit.cli import main

    folder = tmp_path / "repo"
    save_sharded(tied_state_dict(), folder, 800)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "tokenizer.json").write_text("{}")
    save_bin(tied_state_dict(), folder / "pytorch_model.bin")  # another format's weights: not fetched
    hub.add_folder("org/tied", folder)
    args = ["split", "org/tied", str(tmp_path / "out"), "--max-shard-size", "300", "-q"]
    result = CliRunner().invoke(main, args + (["--weights-only"] if weights_only else []))
    assert result.exit_code == 0, result.output
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert ({"config.json", "tokenizer.json"} <= names) is not weights_only
    assert "pytorch_model.bin" not in names
    if not weights_only:
        assert (tmp_path / "out" / "config.json").read_text() == '{"model_type": "llama"}'
