"""shardkit.sources: one Source interface for local folders and Hub repos, one open_source() decision."""

from __future__ import annotations

import pytest
from builders import save_safetensors, varied_state_dict

from shardkit.errors import CheckpointError
from shardkit.hub.remote import HubRepo
from shardkit.naming import select_checkpoint
from shardkit.sources import LocalFolder, Source, is_hub_id, open_source, read_table


def test_local_folder_and_hub_repo_both_satisfy_the_protocol(tmp_path):
    assert isinstance(LocalFolder(tmp_path), Source)
    members = [name for name in dir(Source) if not name.startswith("_")]
    assert all(hasattr(HubRepo, name) or name in ("label", "folder") for name in members), members


def test_open_source_local_file_folder_and_missing(tmp_path):
    save_safetensors(varied_state_dict(), tmp_path / "model.safetensors")
    folder = open_source(tmp_path)
    assert isinstance(folder, LocalFolder) and folder.folder == tmp_path and folder.select_checkpoint() == "model.safetensors"
    single = open_source(tmp_path / "model.safetensors")
    assert single.select_checkpoint() == "model.safetensors" and single.label == str(tmp_path / "model.safetensors")
    assert set(read_table(folder).entries) == set(read_table(single).entries) == set(varied_state_dict())
    data = (tmp_path / "model.safetensors").read_bytes()
    assert folder.read_range("model.safetensors", 3, 20) == data[3:23]
    with pytest.raises(CheckpointError) as info:
        folder.read_range("model.safetensors", len(data) - 4, 10)
    assert info.value.code == "short-read"
    with pytest.raises(CheckpointError) as info:
        open_source(tmp_path / "nope")
    assert info.value.code == "missing-file"
    assert is_hub_id("org/name") and not is_hub_id(str(tmp_path)) and not is_hub_id("./org/name")


def test_select_checkpoint_raises_ambiguous_and_no_checkpoint():
    assert select_checkpoint(["model.safetensors", "pytorch_model.bin"], "x") == "model.safetensors"
    with pytest.raises(CheckpointError) as info:
        select_checkpoint(["a.safetensors", "b.safetensors"], "x", hint="; pick one")
    assert info.value.code == "ambiguous" and str(info.value).endswith("; pick one")
    with pytest.raises(CheckpointError) as info:
        select_checkpoint(["README.md"], "x", "fp16")
    assert info.value.code == "no-checkpoint" and "variant 'fp16'" in str(info.value)
