"""DCP (torch.distributed.checkpoint) folders as a source: reader, inspect, split/convert, validate, plan, loading.

The folders are saved by real gloo process groups (tests/dcp_builders.py); outputs are compared bit for bit with
torch's own reassembly (``dcp_to_torch_save`` then ``torch.load``).
"""

from __future__ import annotations

import json

import pytest
import torch
from builders import tensor_bytes
from cli_helpers import folder_digest, load_any, run_shardkit
from dcp_builders import flatten, model_tensors, tp_tensors, write_dcp
from test_without_torch import shardkit_without_torch

from shardkit import open_checkpoint, split, validate


def reference(folder, name: str) -> dict:
    return flatten(torch.load(folder / f"{name}.pt", weights_only=False))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and tensor_bytes(a) == tensor_bytes(b)


def test_table_of_an_fsdp_checkpoint(dcp_folders):
    checkpoint = open_checkpoint(dcp_folders / "fsdp")
    assert checkpoint.format == "dcp"
    embed = checkpoint["model.model.embed_tokens.weight"]
    assert (embed.dtype, embed.shape, embed.nbytes) == ("BF16", (10, 8), 160)
    assert [(c.offsets, c.sizes) for c in embed.chunks] == [
        ((0, 0), (3, 8)),
        ((3, 0), (3, 8)),
        ((6, 0), (3, 8)),
        ((9, 0), (1, 8)),
    ]
    assert [r[2] for r in embed.ranges] == [48, 48, 48, 16]  # Shard(0): a list of byte ranges
    tiny = checkpoint["model.model.tiny"]  # 2 rows over 4 ranks: two ranks hold nothing
    assert sum(1 for c in tiny.chunks if c.numel) == 2 and len(tiny.ranges) == 2
    step = checkpoint["optim.state.model.tiny.step"]  # a plain tensor saved whole: one ordinary range
    assert step.offset is not None and step.shape == ()
    skipped = {name: what for info in checkpoint.files for name, what in info.skipped.items()}
    assert skipped["step"] == "int 11"
    assert skipped["optim.param_groups.0.lr"] == "float 0.001"
    assert set(skipped) == {"step", "optim.param_groups.0.lr", "optim.param_groups.0.betas", "optim.param_groups.0.params"}
    # the .metadata file names the same checkpoint
    assert open_checkpoint(dcp_folders / "fsdp" / ".metadata").entries.keys() == checkpoint.entries.keys()


def test_tensor_parallel_layouts_are_not_byte_ranges(dcp_folders):
    for name in ("tp", "st", "hf"):
        checkpoint = open_checkpoint(dcp_folders / name)
        assert checkpoint["col.weight"].ranges is None  # Shard(1)
        assert checkpoint["mesh01.weight"].ranges is None  # 2x2 mesh [Shard(0), Shard(1)]
        assert checkpoint["mesh00.weight"].ranges is not None  # [Shard(0), Shard(0)] is still dim-0 slabs
        assert checkpoint["rep.bias"].offset is not None  # replicated: saved once, one range


def test_inspect_shows_groups_and_sharding(dcp_folders):
    result = run_shardkit("inspect", dcp_folders / "fsdp", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["groups"]["model"] == {"tensors": 6, "bytes": sum(t.nbytes for t in model_tensors().values()), "items": 0}
    assert summary["groups"]["optim"]["tensors"] == 15 and summary["groups"]["optim"]["items"] == 3
    assert summary["groups"]["step"] == {"tensors": 0, "bytes": 0, "items": 1}
    layouts = summary["sharding"]["layouts"]
    assert layouts["dim 0"]["tensors"] == 16 and layouts["whole"]["tensors"] == 5
    assert summary["sharding"]["byte_range_copies"] == 21
    text = run_shardkit("inspect", dcp_folders / "tp").stdout
    assert "dims 0,1" in text and "dim 1" in text and "groups" in text


def test_split_keeps_the_model_group_and_equals_torch(dcp_folders, tmp_path):
    ref = reference(dcp_folders, "fsdp")
    result = run_shardkit("split", dcp_folders / "fsdp", tmp_path / "out", "--max-shard-size", "300", "--verify", "-q")
    assert result.returncode == 0, result.stderr
    assert "kept the 6 tensors of the state dict's 'model' group" in result.stdout and "optim (15 tensors)" in result.stdout
    out = load_any(tmp_path / "out")
    assert set(out) == set(model_tensors())
    for name, value in out.items():
        assert same(value, ref["model." + name]), name
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in model_tensors().values())


@pytest.mark.parametrize("name", ["tp", "st", "hf"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_every_layout_equals_torch(dcp_folders, tmp_path, name, fmt):
    ref = reference(dcp_folders, "tp")  # "st" and "hf" hold the same state dict, in torch's other two layouts
    summary = split(dcp_folders / name, tmp_path / "out", format=fmt, max_shard_size="400B", verify=True)
    assert summary.materialized == 0  # assembled without torch
    out = load_any(tmp_path / "out")
    assert set(out) == set(tp_tensors())
    for key, value in out.items():
        assert same(value, ref[key]), key


def test_convert_repacks_and_casts(dcp_folders, tmp_path):
    ref = reference(dcp_folders, "tp")
    result = run_shardkit("convert", dcp_folders / "tp", tmp_path / "out", "--dtype", "bf16", "--json", "-q")
    assert result.returncode == 0, result.stderr
    out = load_any(tmp_path / "out")
    assert same(out["col.weight"], ref["col.weight"].bfloat16())
    assert same(out["colint.weight"], ref["colint.weight"])


def test_dry_run_writes_nothing(dcp_folders, tmp_path):
    result = run_shardkit("split", dcp_folders / "fsdp", tmp_path / "out", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["dry_run"] and summary["tensors"] == 6 and summary["notes"]
    assert not (tmp_path / "out").exists()


def test_shard0_and_assembly_run_without_torch(dcp_folders, tmp_path):
    for name in ("fsdp", "tp", "st", "hf"):
        for args in (
            ["inspect", str(dcp_folders / name)],
            ["split", str(dcp_folders / name), str(tmp_path / name), "--verify", "-q"],
            ["validate", str(dcp_folders / name)],
            ["plan", str(dcp_folders / name), "--max-memory", "cpu=1KB"],
        ):
            result = shardkit_without_torch(*args)
            assert result.returncode == 0, (args, result.stderr)
    assert set(load_any(tmp_path / "fsdp")) == set(model_tensors())


def test_validate_a_sound_folder(dcp_folders):
    for name in ("fsdp", "tp", "st", "hf"):
        report = validate(dcp_folders / name)
        assert report.ok and not report.findings, report.findings
        assert report.tensors_checked == (21 if name == "fsdp" else 8)


def test_load_checkpoint_in_model_from_dcp(dcp_folders):
    from shardkit.bigmodel import load_checkpoint_in_model

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.col = torch.nn.Linear(10, 8, bias=False)
            self.rep = torch.nn.Linear(1, 7)

    model = Model()
    ref = reference(dcp_folders, "tp")
    state = {"col.weight": ref["col.weight"], "rep.bias": ref["rep.bias"]}
    folder = dcp_folders / "tp"
    load_checkpoint_in_model(model, folder, strict=False)  # rep.weight and 6 unused tensors are logged
    assert same(model.col.weight.data, state["col.weight"])
    assert same(model.rep.bias.data, state["rep.bias"])


def test_source_is_never_written(dcp_folders, tmp_path):
    before = folder_digest(dcp_folders / "tp")
    split(dcp_folders / "tp", tmp_path / "out", verify=True)
    assert folder_digest(dcp_folders / "tp") == before


def test_load_the_model_group_of_a_training_checkpoint(dcp_folders):
    from shardkit.bigmodel import load_checkpoint_in_model

    ref = reference(dcp_folders, "fsdp")
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(8, 12, bias=False, dtype=torch.bfloat16)
    model.model = torch.nn.Module()
    model.model.embed_tokens = torch.nn.Embedding(10, 8, dtype=torch.bfloat16)
    load_checkpoint_in_model(model, dcp_folders / "fsdp", strict=False)
    assert same(model.model.embed_tokens.weight.data, ref["model.model.embed_tokens.weight"])
    assert same(model.lm_head.weight.data, ref["model.lm_head.weight"])


def test_plan_sizes_the_model_group(dcp_folders):
    result = run_shardkit("plan", dcp_folders / "fsdp", "--max-memory", "cpu=1GB", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["total_bytes"] == sum(t.nbytes for t in model_tensors().values())


def test_select_and_strip_prefix_choose_other_groups(dcp_folders, tmp_path):
    ref = reference(dcp_folders, "fsdp")
    result = run_shardkit(
        "split",
        dcp_folders / "fsdp",
        tmp_path / "out",
        "--select",
        "optim.state.*.exp_avg",
        "--strip-prefix",
        "optim.state.",
        "-q",
    )
    assert result.returncode == 0, result.stderr
    assert "note:" not in result.stdout  # the user chose: no default group
    out = load_any(tmp_path / "out")
    assert len(out) == 5 and all(name.endswith(".exp_avg") for name in out)
    for name, value in out.items():
        assert same(value, ref["optim.state." + name]), name


def test_chunks_in_any_order_and_dims(tmp_path):
    g = torch.Generator().manual_seed(5)
    tensors = {
        "a": (torch.randn(5, 6, 7, generator=g), 2),  # the last dim of a 3-D tensor
        "b": (torch.randn(7, 3, generator=g).half(), 0),  # uneven: 2,2,2,1 rows
        "c": (torch.arange(24, dtype=torch.int16).reshape(2, 3, 4), 1),  # 3 parts of 1 over 4 ranks: one empty
        "d": (torch.randn(3, generator=g).double(), None),
    }
    write_dcp(tmp_path / "dcp", tensors)
    split(tmp_path / "dcp", tmp_path / "out", verify=True)
    out = load_any(tmp_path / "out")
    for name, (tensor, _) in tensors.items():
        assert same(out[name], tensor), name


def test_memory_is_bounded_by_the_buffers_not_the_tensors(tmp_path):
    from test_split_process import run_child

    tensor = torch.zeros(4096, 3072)  # 48 MiB each
    write_dcp(tmp_path / "dcp", {"rows": (tensor, 0), "cols": (tensor, 1)})
    for name in ("rows", "cols"):
        result, imported, peak = run_child(
            "split", tmp_path / "dcp", tmp_path / name, "--select", name, "--format", "bin", "--verify"
        )
        assert result.returncode == 0, result.stderr
        assert not imported
        # measured: 23 MiB for Shard(0) (the process itself and a 2 MiB copy buffer), 37 MiB for Shard(1) (plus two
        # 8 MiB bands); holding one 48 MiB tensor would take the process past 68 MiB
        limit = 40 if name == "rows" else 56
        assert peak < limit * 2**20, (name, peak / 2**20)


def test_dispatch_with_a_disk_tier_from_dcp(dcp_folders, tmp_path):
    from shardkit.bigmodel import init_empty_weights, load_checkpoint_and_dispatch

    ref = reference(dcp_folders, "tp")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.col = torch.nn.Linear(10, 8, bias=False)
            self.mesh01 = torch.nn.Linear(8, 6, bias=False)

    with init_empty_weights():
        model = Model()
    model = load_checkpoint_and_dispatch(
        model, dcp_folders / "tp", device_map={"col": "cpu", "mesh01": "disk"}, offload_folder=tmp_path, strict=False
    )
    x = torch.randn(2, 8)
    assert same(model.col.weight.data, ref["col.weight"])
    assert torch.equal(model.mesh01(x), x @ ref["mesh01.weight"].T)
