"""What the CLI prints is what is true: counts that agree across commands, plurals, aligned columns, the same dtype
choices in help and errors, and a JSON document for every validate outcome."""

from __future__ import annotations

import json

from builders import save_bin, save_safetensors, tied_state_dict
from cli_helpers import run_shardkit

from shardkit.dtypes import CAST_CHOICES_TEXT


def test_inspect_and_validate_count_tensors_the_same_way(tmp_path):
    path = save_bin(tied_state_dict(), tmp_path / "pytorch_model.bin")
    inspect = run_shardkit("inspect", path)
    validate = run_shardkit("validate", path)
    assert "6 tensors (+1 alias)" in inspect.stdout.splitlines()[2]
    assert validate.stdout.strip().splitlines()[-1].endswith("0 errors, 0 warnings; 1 file read, 6 tensors (+1 alias)")


def test_a_broken_single_file_is_not_zero_files_and_zero_tensors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    result = run_shardkit("validate", tmp_path / "model.safetensors")
    assert result.returncode == 1
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("BROKEN: ") and "; no checkpoint file could be read" in last
    assert "0 files" not in last and "0 tensors" not in last and " 1 error," in last and "errors" not in last


def test_validate_json_of_an_unreadable_target_is_still_a_document(tmp_path):
    result = run_shardkit("validate", tmp_path / "nowhere", "--json")
    assert result.returncode == 2
    document = json.loads(result.stdout)
    assert document["verdict"] == "unreadable" and document["findings"] == []
    assert document["error"]["code"] == "missing-file" and "no such file or folder" in document["error"]["message"]
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("shardkit: error: ")
    (tmp_path / "empty").mkdir()
    result = run_shardkit("validate", tmp_path / "empty", "--json")
    assert result.returncode == 2 and json.loads(result.stdout)["error"]["code"] == "no-checkpoint"


def test_inspect_tensor_list_has_an_aligned_file_column(tmp_path):
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict(tied_state_dict(), str(tmp_path), max_shard_size=400)
    out = run_shardkit("inspect", tmp_path, "--tensors").stdout.splitlines()
    table = out[out.index("tensors") + 1 :]
    header = table[0].split()
    assert header == ["name", "dtype", "shape", "size", "file"]
    column = table[0].index("file")
    for line in table[1:]:
        cell = line[column:]
        assert cell.startswith(("model-0000", "= ")), line  # a shard file, or the tensor an alias shares
    assert any("= lm_head.weight" in line for line in table)
    assert {line[column:].split()[0] for line in table[1:] if not line[column:].startswith("=")} == {
        p.name for p in tmp_path.glob("model-*.safetensors")
    }


def test_dtype_help_and_error_list_the_same_choices(tmp_path):
    path = save_bin(tied_state_dict(), tmp_path / "pytorch_model.bin")
    help_text = " ".join(run_shardkit("split", "--help").stdout.split())
    assert CAST_CHOICES_TEXT in help_text
    for bad in ("int8", "fp17"):
        result = run_shardkit("split", path, tmp_path / "out", "--dtype", bad)
        assert result.returncode == 2
        assert result.stderr.strip() == f"shardkit: error: --dtype {bad!r}: use one of {CAST_CHOICES_TEXT}"


def test_plurals(tmp_path):
    state = {"only.weight": tied_state_dict()["model.norm.weight"]}
    path = save_safetensors(state, tmp_path / "model.safetensors")
    split = run_shardkit("split", path, tmp_path / "out").stdout
    assert "1 file, 1 tensor," in split and "1 tensors" not in split and "file(s)" not in split
    inspect = run_shardkit("inspect", path).stdout
    assert "1 tensor " in inspect and "1 tensors" not in inspect
