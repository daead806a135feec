"""``shardkit split``: output equal to huggingface_hub's, loadable by safetensors/torch, atomic, streaming."""

from __future__ import annotations

import json
import os
import struct

import orjson
import pytest
import torch
from builders import save_bin, save_safetensors, tensor_bytes, tied_state_dict, varied_state_dict
from cli_helpers import folder_digest, load_any, run_shardkit
from huggingface_hub import save_torch_state_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import shardkit
from shardkit.errors import CheckpointError, UsageError


def lm_state() -> dict[str, torch.Tensor]:
    state = varied_state_dict()
    state.update(tied_state_dict(1))
    return state


def exotic_state() -> dict[str, torch.Tensor]:
    """Dtypes that take torch's ``_rebuild_tensor_v3`` path in a .bin, plus a non-contiguous view."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 4, generator=g)
    return {
        "u16": torch.randint(0, 60000, (5,), generator=g).to(torch.uint16),
        "u32": torch.randint(0, 2**31, (3,), generator=g).to(torch.uint32),
        "f8": torch.randn(7, generator=g).to(torch.float8_e4m3fn),
        "c64": torch.randn(3, generator=g, dtype=torch.complex64),
        "transposed": base.t(),  # stored as its storage: materialized one tensor at a time
        "row": base[2],  # contiguous view into the same storage: copied as a byte range
    }


def safetensors_parts(path) -> tuple[dict, bytes]:
    raw = open(path, "rb").read()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def assert_same_tensors(actual: dict, expected: dict) -> None:
    assert list(sorted(actual)) == list(sorted(expected))
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and actual[name].shape == tensor.shape, name
        assert tensor_bytes(actual[name]) == tensor_bytes(tensor), name  # bit for bit (NaNs and -0.0 included)


@pytest.mark.parametrize("limit", [300, 1000])
def test_sharded_safetensors_byte_identical_to_huggingface_hub(tmp_path, limit):
    save_bin(lm_state(), tmp_path / "src.bin")
    (tmp_path / "hub").mkdir()
    save_torch_state_dict(torch.load(tmp_path / "src.bin", weights_only=True), tmp_path / "hub", max_shard_size=limit)
    summary = shardkit.split(tmp_path / "src.bin", tmp_path / "out", max_shard_size=limit)
    assert folder_digest(tmp_path / "out") == folder_digest(tmp_path / "hub")  # shards and index, byte for byte
    assert summary.dropped == {"model.embed_tokens.weight": "lm_head.weight"}
    assert len(summary.files) == len(os.listdir(tmp_path / "hub")) - 1


def test_single_file_matches_huggingface_hub(tmp_path):
    save_bin(lm_state(), tmp_path / "src.bin")
    (tmp_path / "hub").mkdir()
    save_torch_state_dict(torch.load(tmp_path / "src.bin", weights_only=True), tmp_path / "hub")
    shardkit.split(tmp_path / "src.bin", tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["model.safetensors"]
    # The reference writer orders __metadata__ keys at random (a Rust HashMap); all else is byte-identical.
    hub_header, hub_data = safetensors_parts(tmp_path / "hub" / "model.safetensors")
    header, data = safetensors_parts(tmp_path / "out" / "model.safetensors")
    assert header == hub_header and data == hub_data
    assert header["__metadata__"] == {"format": "pt", "model.embed_tokens.weight": "lm_head.weight"}
    assert (tmp_path / "out" / "model.safetensors").stat().st_size == (tmp_path / "hub" / "model.safetensors").stat().st_size


@pytest.mark.parametrize("limit", [250, 10**9])
def test_bin_output_loads_with_torch_and_keeps_sharing(tmp_path, limit):
    state = lm_state()
    save_bin(state, tmp_path / "src.bin")
    (tmp_path / "hub").mkdir()
    save_torch_state_dict(
        torch.load(tmp_path / "src.bin", weights_only=True), tmp_path / "hub", max_shard_size=limit, safe_serialization=False
    )
    shardkit.split(tmp_path / "src.bin", tmp_path / "out", max_shard_size=limit, format="bin", verify=True)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(tmp_path / "hub"))
    index = "pytorch_model.bin.index.json"
    if (tmp_path / "hub" / index).exists():
        assert (tmp_path / "out" / index).read_bytes() == (tmp_path / "hub" / index).read_bytes()
    loaded = load_any(tmp_path / "out")
    assert_same_tensors(loaded, state)
    assert (
        loaded["lm_head.weight"].untyped_storage().data_ptr() == loaded["model.embed_tokens.weight"].untyped_storage().data_ptr()
    )
    # and shardkit's own reader sees the alias
    assert shardkit.open_checkpoint(tmp_path / "out").aliases == {"model.embed_tokens.weight": "lm_head.weight"}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_exotic_dtypes_and_views_round_trip(tmp_path, fmt):
    state = exotic_state()
    save_bin(state, tmp_path / "src.bin")
    summary = shardkit.split(tmp_path / "src.bin", tmp_path / "out", max_shard_size="40B", format=fmt, verify=True)
    assert summary.materialized == 1 and summary.verified
    assert_same_tensors(load_any(tmp_path / "out"), state)


def test_safetensors_source_with_declared_aliases_is_retied(tmp_path):
    state = tied_state_dict()
    (tmp_path / "hub").mkdir()
    save_torch_state_dict(dict(state), tmp_path / "hub", max_shard_size=300)  # (it deletes dropped names in place)
    out = tmp_path / "out"
    shardkit.split(tmp_path / "hub", out, max_shard_size="10GB")
    assert load_file(out / "model.safetensors").keys() == {k for k in state if k != "model.embed_tokens.weight"}
    assert shardkit.open_checkpoint(out).aliases == {"model.embed_tokens.weight": "lm_head.weight"}
    shardkit.split(out, tmp_path / "bin", format="bin")
    loaded = torch.load(tmp_path / "bin" / "pytorch_model.bin", weights_only=True)
    assert_same_tensors(loaded, state)
    assert loaded["lm_head.weight"].data_ptr() == loaded["model.embed_tokens.weight"].data_ptr()


def test_dtype_cast(tmp_path):
    state = varied_state_dict()
    save_safetensors(state, tmp_path / "src.safetensors")
    summary = shardkit.split(tmp_path / "src.safetensors", tmp_path / "out", dtype="bf16", verify=True)
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    for name, tensor in state.items():
        expected = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert loaded[name].dtype == expected.dtype and torch.equal(loaded[name], expected), name
    # every floating tensor not already bf16 went through torch; bf16 and integer ones were copied as bytes
    assert summary.materialized == sum(t.is_floating_point() and t.dtype != torch.bfloat16 for t in state.values()) == 5
    with pytest.raises(UsageError, match=r"--dtype 'int8': use one of bf16, fp16, fp32, fp64 or auto"):
        shardkit.split(tmp_path / "src.safetensors", tmp_path / "out2", dtype="int8")


def test_dry_run_and_json(tmp_path):
    save_bin(lm_state(), tmp_path / "src.bin")
    result = run_shardkit("split", tmp_path / "src.bin", tmp_path / "out", "--max-shard-size", "1kB", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    summary = orjson.loads(result.stdout)
    assert not (tmp_path / "out").exists() and summary["dry_run"] is True
    assert [f["name"] for f in summary["files"]] == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    assert summary["index"] == "model.safetensors.index.json" and summary["tensors"] == 16
    assert sum(f["tensors"] for f in summary["files"]) == 16 and sum(f["size"] for f in summary["files"]) > summary["total_size"]
    # the sizes are those of the files the real run writes (headers and zip records included), in both formats
    for fmt in ("safetensors", "bin"):
        args = ("split", tmp_path / "src.bin", tmp_path / fmt, "--max-shard-size", "1kB", "--format", fmt, "--json")
        planned = orjson.loads(run_shardkit(*args, "--dry-run").stdout)["files"]
        written = orjson.loads(run_shardkit(*args).stdout)["files"]
        assert (
            planned
            == written
            == [
                {"name": f["name"], "size": (tmp_path / fmt / f["name"]).stat().st_size, "tensors": f["tensors"]} for f in written
            ]
        )
    human = run_shardkit("split", tmp_path / "src.bin", tmp_path / "out", "--max-shard-size", "1kB", "--dry-run")
    assert "would write" in human.stdout and "model-00005-of-00005.safetensors" in human.stdout


def test_verify_reported_in_json(tmp_path):
    save_bin(lm_state(), tmp_path / "src.bin")
    result = run_shardkit("split", tmp_path / "src.bin", tmp_path / "out", "--verify", "--json")
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout)["verified"] is True


@pytest.mark.parametrize(
    "size, message",
    [
        ("5G", "ambiguous"),
        ("five", "cannot read 'five' as a size"),
        ("0", "must be larger than zero"),
        ("-3MB", "cannot read '-3MB' as a size"),
        ("5parsecs", "unknown unit 'parsecs'"),
    ],
)
def test_bad_sizes_rejected(tmp_path, size, message):
    save_bin(lm_state(), tmp_path / "src.bin")
    result = run_shardkit("split", tmp_path / "src.bin", tmp_path / "out", "--max-shard-size", size)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", ["5GiB", "5GB", "500MB", "123456", "1.5kB"])
def test_good_sizes_accepted(tmp_path, size):
    save_bin(lm_state(), tmp_path / "src.bin")
    assert run_shardkit("split", tmp_path / "src.bin", tmp_path / "out", "--max-shard-size", size, "--dry-run").returncode == 0


def test_non_empty_destination_and_overwrite(tmp_path):
    save_bin(lm_state(), tmp_path / "src.bin")
    out = tmp_path / "out"
    shardkit.split(tmp_path / "src.bin", out, max_shard_size=300)
    (out / "config.json").write_text("{}")
    old_shards = {p.name for p in out.glob("model-*.safetensors")}
    assert len(old_shards) == 9
    refused = run_shardkit("split", tmp_path / "src.bin", out)
    assert refused.returncode == 2 and "folder is not empty; pass --overwrite" in refused.stderr
    assert {p.name for p in out.glob("model-*.safetensors")} == old_shards
    result = run_shardkit("split", tmp_path / "src.bin", out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # stale shards and index gone, config kept
    assert_same_tensors(
        load_file(out / "model.safetensors"), {k: v for k, v in lm_state().items() if k != "model.embed_tokens.weight"}
    )
    # and back to a sharded layout of another size
    assert run_shardkit("split", tmp_path / "src.bin", out, "--overwrite", "--max-shard-size", "1kB").returncode == 0
    assert sorted(os.listdir(out)) == ["config.json"] + [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)] + [
        "model.safetensors.index.json"
    ]
    assert shardkit.open_checkpoint(out).total_bytes == shardkit.open_checkpoint(tmp_path / "src.bin").total_bytes


def test_destination_inside_source_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_safetensors(varied_state_dict(), src / "model.safetensors")
    before = folder_digest(src)
    for dst in (src, src / "sub", src / "sub" / "deeper"):
        result = run_shardkit("split", src, dst, "--overwrite")
        assert result.returncode == 2 and "inside it; write somewhere else" in result.stderr
    result = run_shardkit("split", src / "model.safetensors", src, "--overwrite")
    assert result.returncode == 2 and "write somewhere else" in result.stderr
    assert folder_digest(src) == before and not (src / "sub").exists()
    # a sibling folder of a single source file is fine
    assert run_shardkit("split", src / "model.safetensors", tmp_path / "out").returncode == 0


def test_short_source_leaves_nothing(tmp_path):
    save_safetensors(varied_state_dict(), tmp_path / "src.safetensors")
    checkpoint = shardkit.open_checkpoint(tmp_path / "src.safetensors")
    size = (tmp_path / "src.safetensors").stat().st_size
    os.truncate(tmp_path / "src.safetensors", size - 20)  # the file shrinks after its header was read
    with pytest.raises(CheckpointError, match="short of the data it declares") as error:
        shardkit.split(checkpoint, tmp_path / "out")
    assert error.value.code == "short-read"
    assert os.listdir(tmp_path) == ["src.safetensors"]


def test_split_and_convert_take_a_path_or_an_open_checkpoint_and_run_twins_are_deprecated_aliases(tmp_path):
    state = varied_state_dict()
    save_safetensors(state, tmp_path / "src.safetensors")
    checkpoint = shardkit.open_checkpoint(tmp_path / "src.safetensors")
    by_path = shardkit.split(tmp_path / "src.safetensors", tmp_path / "a", max_shard_size=300)
    by_table = shardkit.split(checkpoint, tmp_path / "b", max_shard_size=300)
    with pytest.warns(DeprecationWarning, match="shardkit.split"):
        by_alias = shardkit.run_split(checkpoint, tmp_path / "c", max_shard_size=300)
    assert len(by_path.files) > 1 and by_path.files == by_table.files == by_alias.files
    for name in ("a", "b", "c"):
        assert folder_digest(tmp_path / name) == folder_digest(tmp_path / "a")
    with pytest.warns(DeprecationWarning, match="shardkit.convert"):
        shardkit.run_convert(checkpoint, tmp_path / "d", format="bin")
    shardkit.convert(checkpoint, tmp_path / "e", format="bin")
    assert folder_digest(tmp_path / "d") == folder_digest(tmp_path / "e")
    loaded = {k: v for path in sorted((tmp_path / "b").glob("*.safetensors")) for k, v in load_file(str(path)).items()}
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    with pytest.raises(TypeError):
        shardkit.split(checkpoint, tmp_path / "f", no_such_option=True)


def test_truncated_source_one_line_error(tmp_path):
    save_safetensors(varied_state_dict(), tmp_path / "src.safetensors")
    os.truncate(tmp_path / "src.safetensors", (tmp_path / "src.safetensors").stat().st_size - 4)
    result = run_shardkit("split", tmp_path / "src.safetensors", tmp_path / "out")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and "truncated" in result.stderr
    assert os.listdir(tmp_path) == ["src.safetensors"]


def test_source_never_modified(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    save_bin(lm_state(), src / "pytorch_model.bin")
    before = folder_digest(src)
    for fmt in ("safetensors", "bin"):
        shardkit.split(src, tmp_path / f"out-{fmt}", max_shard_size=500, format=fmt, verify=True)
    assert folder_digest(src) == before


def test_legacy_source(tmp_path):
    state = lm_state()
    torch.save(state, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    for fmt in ("safetensors", "bin"):
        summary = shardkit.split(tmp_path / "old.pt", tmp_path / fmt, max_shard_size="1kB", format=fmt, verify=True)
        assert summary.materialized == summary.tensors == 16
        loaded = load_any(tmp_path / fmt)
        assert_same_tensors({k: loaded[k] for k in loaded}, {k: v for k, v in state.items() if k in loaded})
        assert len(loaded) == (16 if fmt == "safetensors" else 17)


def test_empty_existing_destination_is_used(tmp_path):
    save_bin(lm_state(), tmp_path / "src.bin")
    (tmp_path / "out").mkdir()
    shardkit.split(tmp_path / "src.bin", tmp_path / "out", max_shard_size="1kB")
    assert len(os.listdir(tmp_path / "out")) == 6


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.uint8, torch.bool, torch.float64]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shapes=st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 9), max_size=3)), min_size=1, max_size=10),
    ties=st.lists(st.integers(0, 9), max_size=3),
    limit=st.integers(1, 600),
    fmt=st.sampled_from(["safetensors", "bin"]),
)
def test_random_state_dicts_split_and_load_back(tmp_path_factory, shapes, ties, limit, fmt):
    g = torch.Generator().manual_seed(len(shapes) * 1000 + limit)
    state = {}
    for i, (dtype, shape) in enumerate(shapes):
        values = torch.randn(tuple(shape), generator=g) * 50
        state[f"t{i:02d}"] = values > 0 if dtype == torch.bool else values.to(dtype)
    for j, target in enumerate(ties):
        state[f"tied{j}"] = state[f"t{target % len(shapes):02d}"]
    folder = tmp_path_factory.mktemp("case")
    save_bin(state, folder / "src.bin")
    summary = shardkit.split(folder / "src.bin", folder / "out", max_shard_size=limit, format=fmt, verify=True)
    loaded = load_any(folder / "out")
    checkpoint = shardkit.open_checkpoint(folder / "out")
    assert sorted(checkpoint.entries) == sorted(state)  # dropped names come back as aliases
    for name, tensor in state.items():
        kept = name if name in loaded else summary.dropped[name]
        assert loaded[kept].dtype == tensor.dtype and tensor_bytes(loaded[kept]) == tensor_bytes(tensor), name
    assert checkpoint.total_bytes == summary.total_size
