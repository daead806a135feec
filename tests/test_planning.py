"""Shard planning: the same file assignment as huggingface_hub for the same input."""

from __future__ import annotations

import pytest
import torch
from builders import save_bin, tied_state_dict, varied_state_dict
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.serialization._base import split_state_dict_into_shards_factory
from hypothesis import given, settings
from hypothesis import strategies as st

from shardkit import open_checkpoint
from shardkit.errors import UsageError
from shardkit.write.plan import pack, plan_convert, plan_split, safetensors_order


class Fake:
    """A stand-in tensor for huggingface_hub's generic splitter (which skips plain strings)."""

    def __init__(self, key: str) -> None:
        self.key = key


def hub_groups(sizes: dict[str, int], storage: dict[str, int], limit: int) -> list[list[str]]:
    split = split_state_dict_into_shards_factory(
        {key: Fake(key) for key in sizes},
        get_storage_size=lambda fake: sizes[fake.key],
        get_storage_id=lambda fake: storage[fake.key],
        filename_pattern="model{suffix}.safetensors",
        max_shard_size=limit,
    )
    return [list(keys) for keys in split.filename_to_tensors.values()]


def test_pack_matches_hub_test_case():
    # huggingface_hub's tests/test_serialization.py: an oversized tensor takes the next number at once.
    sizes = {"l1": 6, "l2": 10, "l3": 30, "l4": 2, "l5": 2}
    expected = [["l1"], ["l3"], ["l2"], ["l4", "l5"]]
    assert hub_groups(sizes, {k: k for k in sizes}, 10) == expected
    assert pack([(k, k, s) for k, s in sizes.items()], 10) == expected


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 12)), min_size=1, max_size=30),
    st.integers(1, 50),
)
def test_pack_matches_hub_on_random_inputs(items, limit):
    sizes = {f"t{i}": size for i, (size, _) in enumerate(items)}
    storage = {f"t{i}": group for i, (_, group) in enumerate(items)}
    # a shared storage has one size: the first key's, as hub measures it
    first_size = {}
    for key, group in storage.items():
        first_size.setdefault(group, sizes[key])
    sizes = {key: first_size[storage[key]] for key in sizes}
    assert pack([(k, storage[k], sizes[k]) for k in sizes], limit) == hub_groups(sizes, storage, limit)


def state_with_views() -> dict[str, torch.Tensor]:
    state = varied_state_dict()
    state.update(tied_state_dict(1))
    return state


@pytest.mark.parametrize("limit", [1, 200, 500, 1000, 10**9])
def test_bin_plan_equals_hub_split(tmp_path, limit):
    state = state_with_views()
    checkpoint = open_checkpoint(save_bin(state, tmp_path / "src.bin"))
    hub = split_torch_state_dict_into_shards(
        torch.load(tmp_path / "src.bin", weights_only=True), filename_pattern="pytorch_model{suffix}.bin", max_shard_size=limit
    )
    plan = plan_split(checkpoint, limit, "bin")
    assert {f.name: list(f.keys) for f in plan.files} == hub.filename_to_tensors
    assert plan.weight_map == hub.tensor_to_filename
    assert plan.total_size == hub.metadata["total_size"]


@pytest.mark.parametrize("limit", [1, 200, 500, 1000, 10**9])
def test_safetensors_plan_equals_hub_split_of_cleaned_state(tmp_path, limit):
    state = state_with_views()
    checkpoint = open_checkpoint(save_bin(state, tmp_path / "src.bin"))
    loaded = torch.load(tmp_path / "src.bin", weights_only=True)
    # huggingface_hub drops every shared name but the alphabetically first before splitting
    del loaded["model.embed_tokens.weight"]
    hub = split_torch_state_dict_into_shards(loaded, max_shard_size=limit)
    plan = plan_split(checkpoint, limit, "safetensors")
    assert {f.name: [t.name for t in f.tensors] for f in plan.files} == hub.filename_to_tensors
    assert plan.dropped == {"model.embed_tokens.weight": "lm_head.weight"}
    assert plan.total_size == hub.metadata["total_size"]


def test_convert_plan_keeps_layout(tmp_path):
    from builders import save_sharded

    (tmp_path / "src").mkdir()
    save_sharded(state_with_views(), tmp_path / "src", 400, safe=False)
    checkpoint = open_checkpoint(tmp_path / "src")
    plan = plan_convert(checkpoint, "safetensors")
    source_files = sorted(info.path for info in checkpoint.files)
    assert len(plan.files) == len(source_files) > 1
    for planned, source in zip(plan.files, source_files):
        source_names = {e.name for e in checkpoint if e.file == source and e.alias_of is None}
        assert {t.name for t in planned.tensors} == source_names
    assert plan.index["weight_map"] == {name: f.name for f in plan.files for name in f.keys}


def test_safetensors_order_is_the_reference_writers(tmp_path):
    from safetensors.torch import save_file

    state = {
        "b": torch.zeros(2, dtype=torch.int8),
        "a": torch.zeros(2, dtype=torch.float64),
        "c": torch.zeros(3),
        "d": torch.zeros(1, dtype=torch.bfloat16),
        "e": torch.zeros(1, dtype=torch.float16),
        "f": torch.zeros(2, dtype=torch.uint16),
        "g": torch.zeros(2, dtype=torch.int64),
        "h": torch.zeros(2, dtype=torch.float8_e4m3fn),
        "i": torch.zeros(2, dtype=torch.bool),
        "j": torch.zeros(2, dtype=torch.int32),
        "k": torch.zeros(2, dtype=torch.uint32),
    }
    save_file(state, tmp_path / "ref.safetensors")
    checkpoint = open_checkpoint(tmp_path / "ref.safetensors")
    plan = plan_split(checkpoint, 10**9)
    assert [t.name for t in safetensors_order(plan.files[0].tensors)] == list(checkpoint.entries)


def test_dtype_cast_only_touches_floating_tensors(tmp_path):
    checkpoint = open_checkpoint(save_bin(varied_state_dict(), tmp_path / "src.bin"))
    plan = plan_split(checkpoint, 10**9, dtype="BF16")
    out = {t.name: t.dtype for t in plan.files[0].tensors}
    assert out["layers.0.mlp.up.weight"] == "BF16" and out["scale"] == "BF16"
    assert out["position_ids"] == "I64" and out["layers.1.mask"] == "BOOL" and out["layers.1.quant.weight"] == "I8"
    assert plan.total_size == sum(t.nbytes for t in plan.files[0].tensors)


def test_complex128_cannot_go_to_safetensors(tmp_path):
    checkpoint = open_checkpoint(save_bin({"c": torch.zeros(2, dtype=torch.complex128)}, tmp_path / "src.bin"))
    with pytest.raises(UsageError, match="'c' is C128, which a .safetensors file cannot hold"):
        plan_split(checkpoint, 10**9, "safetensors")
    assert plan_split(checkpoint, 10**9, "bin").files[0].tensors[0].dtype == "C128"
