"""The reader's table equals what safetensors / torch report, for every layout, and its byte ranges hold the bytes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import save_bin, save_safetensors, save_sharded, tensor_bytes, tied_state_dict, varied_state_dict
from safetensors import safe_open

from shardkit import load_tensor, open_checkpoint
from shardkit.dtypes import from_torch_dtype


def assert_table_matches(checkpoint, expected: dict[str, torch.Tensor]) -> None:
    """Names, dtypes, shapes equal; every byte range holds the tensor's bytes; every entry materializes equal."""
    assert set(checkpoint.entries) == set(expected)
    handles = {}
    try:
        for name, tensor in expected.items():
            entry = checkpoint[name]
            assert entry.dtype == from_torch_dtype(tensor.dtype), name
            assert entry.shape == tuple(tensor.shape), name
            assert entry.nbytes == tensor.numel() * tensor.element_size(), name
            if entry.byte_range is not None:
                start, stop = entry.byte_range
                handle = handles.setdefault(entry.file, open(entry.file, "rb"))
                handle.seek(start)
                assert handle.read(stop - start) == tensor_bytes(tensor), name
            loaded = load_tensor(entry)
            assert loaded.dtype == tensor.dtype and torch.equal(loaded, tensor), name
    finally:
        for handle in handles.values():
            handle.close()


def test_safetensors_file_matches_safe_open(tmp_path):
    state = varied_state_dict()
    path = save_safetensors(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    checkpoint = open_checkpoint(path)
    assert checkpoint.format == "safetensors"
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(checkpoint.entries)
        assert checkpoint.files[0].metadata == f.metadata()
        expected = {k: f.get_tensor(k) for k in f.keys()}
    assert_table_matches(checkpoint, expected)
    # Entries come in file order, the order safetensors.torch.load_file yields.
    from safetensors.torch import load_file

    assert list(checkpoint.entries) == list(load_file(str(path)))


def test_torch_zip_matches_torch_load(tmp_path):
    state = varied_state_dict()
    path = save_bin(state, tmp_path / "pytorch_model.bin")
    checkpoint = open_checkpoint(path)
    assert checkpoint.format == "torch-zip"
    assert list(checkpoint.entries) == list(state)  # pickle key order
    assert_table_matches(checkpoint, torch.load(path, weights_only=True))


def test_torch_zip_non_contiguous_views_and_storage_offsets(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = {"base": base, "column": base[:, 3], "transposed": base.t(), "tail": base[4:], "row": base[2]}
    path = save_bin(state, tmp_path / "views.pt")
    checkpoint = open_checkpoint(path)
    assert checkpoint["column"].offset is None and checkpoint["transposed"].offset is None
    assert checkpoint["tail"].offset == checkpoint["base"].offset + 40 * 4
    assert checkpoint["column"].storage.key == checkpoint["base"].storage.key
    assert_table_matches(checkpoint, {k: v.contiguous() for k, v in state.items()})


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_state_dict_is_unwrapped(tmp_path, wrapper):
    state = varied_state_dict()
    path = save_bin({wrapper: state, "epoch": 7, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pt")
    checkpoint = open_checkpoint(path)
    assert list(checkpoint.entries) == list(state)
    assert checkpoint.files[0].skipped == {
        "epoch": f"int beside the {wrapper!r} state dict",
        "optimizer": f"dict of 1 entries beside the {wrapper!r} state dict",
    }


def test_non_tensor_values_are_reported(tmp_path):
    path = save_bin({"w": torch.ones(2), "step": 3, "note": "hello"}, tmp_path / "x.pt")
    checkpoint = open_checkpoint(path)
    assert list(checkpoint.entries) == ["w"]
    assert checkpoint.files[0].skipped == {"step": "int", "note": "str"}


def test_tied_weights_in_bin_are_aliases(tmp_path):
    state = tied_state_dict()
    checkpoint = open_checkpoint(save_bin(state, tmp_path / "pytorch_model.bin"))
    # The alphabetically first name is kept, as huggingface_hub keeps it.
    assert checkpoint.aliases == {"model.embed_tokens.weight": "lm_head.weight"}
    assert checkpoint.total_bytes == sum(t.numel() * 4 for k, t in state.items() if k != "lm_head.weight")
    assert_table_matches(checkpoint, state)


def test_aliases_recorded_by_huggingface_hub_are_read_back(tmp_path):
    state = tied_state_dict()
    folder = save_sharded(state, tmp_path / "single", max_shard_size="1GB")
    single = open_checkpoint(folder)
    assert single.aliases == {"model.embed_tokens.weight": "lm_head.weight"}
    assert_table_matches(single, state)

    folder = save_sharded(state, tmp_path / "sharded", max_shard_size=600)
    sharded = open_checkpoint(folder)
    assert sharded.index is not None and len(sharded.files) > 1
    assert sharded.aliases == {"model.embed_tokens.weight": "lm_head.weight"}
    assert_table_matches(sharded, state)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_sharded_folder_and_index(tmp_path, safe):
    state = varied_state_dict()
    folder = save_sharded(state, tmp_path / "out", max_shard_size=500, safe=safe)
    index_name = "model.safetensors.index.json" if safe else "pytorch_model.bin.index.json"
    index = json.loads((folder / index_name).read_text())
    for source in (folder, folder / index_name):
        checkpoint = open_checkpoint(source)
        assert checkpoint.index is not None
        assert checkpoint.total_bytes == index["metadata"]["total_size"]
        assert {e.name: Path(e.file).name for e in checkpoint} == index["weight_map"]
        assert_table_matches(checkpoint, state)


def test_variant_index_and_single_file(tmp_path):
    state = varied_state_dict()
    save_safetensors(state, tmp_path / "model.fp16.safetensors")
    save_safetensors({"other": torch.ones(1)}, tmp_path / "model.safetensors")
    assert set(open_checkpoint(tmp_path, variant="fp16").entries) == set(state)
    assert set(open_checkpoint(tmp_path).entries) == {"other"}

    sharded = tmp_path / "sharded"
    save_sharded(state, sharded, max_shard_size=500)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    renamed = {}
    for old in sorted(set(index["weight_map"].values())):
        new = old.replace("model-", "model.fp16-")
        (sharded / old).rename(sharded / new)
        renamed[old] = new
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    (sharded / "model.safetensors.index.json").unlink()
    (sharded / "model.safetensors.index.fp16.json").write_text(json.dumps(index))
    checkpoint = open_checkpoint(sharded, variant="fp16")
    assert checkpoint.index.path.endswith("model.safetensors.index.fp16.json")
    assert_table_matches(checkpoint, state)
    # A folder with only a variant index is still found without naming the variant.
    assert set(open_checkpoint(sharded).entries) == set(state)


def test_hugging_face_cache_snapshot(tmp_path):
    state = varied_state_dict()
    source = save_sharded(state, tmp_path / "src", max_shard_size=500)
    repo = tmp_path / "hub" / "models--org--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for i, file in enumerate(sorted(source.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    for target in (repo, snapshot):
        checkpoint = open_checkpoint(target)
        assert checkpoint.index is not None
        assert_table_matches(checkpoint, state)


def test_legacy_torch_file(tmp_path):
    state = tied_state_dict()
    path = tmp_path / "old.pt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    checkpoint = open_checkpoint(path)
    assert checkpoint.format == "torch-legacy"
    assert all(e.byte_range is None for e in checkpoint)
    assert checkpoint.aliases == {"model.embed_tokens.weight": "lm_head.weight"}
    assert_table_matches(checkpoint, state)


def test_real_minilm_checkpoint(minilm):
    checkpoint = open_checkpoint(minilm)
    path = minilm / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        expected = {k: f.get_tensor(k) for k in f.keys()}
    assert len(checkpoint) == 104 and checkpoint.total_params == 22_713_728
    assert_table_matches(checkpoint, expected)


def test_minilm_as_bin_matches(tmp_path, minilm):
    from safetensors.torch import load_file

    state = load_file(str(minilm / "model.safetensors"))
    path = save_bin(state, tmp_path / "pytorch_model.bin")
    assert_table_matches(open_checkpoint(tmp_path), state)
    assert open_checkpoint(tmp_path).files[0].path == str(path)


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_reading_never_imports_torch(tmp_path, kind):
    state = tied_state_dict()
    if kind == "safetensors":
        save_sharded(state, tmp_path, max_shard_size=600)
    else:
        save_bin(state, tmp_path / "pytorch_model.bin")
    code = (
        "import sys\n"
        "from shardkit.cli import main\n"
        f"main(['inspect', {str(tmp_path)!r}, '--json'], standalone_mode=False)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'numpy' not in sys.modules, 'numpy was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tensors"] == 6


def test_module_state_dict_with_metadata(tmp_path):
    """``torch.save(model.state_dict())`` pickles the OrderedDict's ``_metadata`` through BUILD: accepted, dropped."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    state = model.state_dict()
    assert hasattr(state, "_metadata")
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    checkpoint = open_checkpoint(path)
    assert list(checkpoint.entries) == list(state)
    assert_table_matches(checkpoint, dict(state))
    assert checkpoint.files[0].skipped == {}
