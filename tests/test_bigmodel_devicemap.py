"""Device maps: equal to accelerate's on the same models and budgets, except the deliberate differences below."""

from __future__ import annotations

import warnings

import pytest
import torch
from accelerate.utils import compute_module_sizes as acc_sizes
from accelerate.utils import find_tied_parameters as acc_tied
from accelerate.utils import get_balanced_memory as acc_balanced
from accelerate.utils import infer_auto_device_map as acc_infer
from bigmodels import build

from shardkit import (
    UsageError,
    check_device_map,
    compute_module_sizes,
    find_tied_parameters,
    get_balanced_memory,
    infer_auto_device_map,
    init_empty_weights,
)
from shardkit.bigmodel import placement
from shardkit.bigmodel.devicemap import resolve_device_map
from shardkit.bigmodel.measure import module_tree
from shardkit.bigmodel.readahead import disk_ring

KINDS = ["llama", "opt", "gpt2", "bert", "t5"]


def budgets(total: int):
    """One GPU + CPU, CPU only, two GPUs + CPU, from starved to roomy."""
    for frac in [0.05, 0.15, 0.3, 0.45, 0.6, 0.8, 1.0, 1.3]:
        size = int(total * frac)
        yield {0: size, "cpu": size}
        yield {"cpu": size}
        yield {0: size // 2, 1: size // 2, "cpu": total}


def accelerate_map(model, max_memory, no_split):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(acc_infer(model, max_memory=dict(max_memory), no_split_module_classes=no_split))


@pytest.mark.parametrize("kind", KINDS)
def test_match_accelerate_reproduces_accelerate_exactly(kind):
    model = build(kind, empty=True)
    total = acc_sizes(model)[""]
    for max_memory in budgets(total):
        for no_split in (model._no_split_modules, None):
            want = accelerate_map(model, max_memory, no_split)
            ours = infer_auto_device_map(model, dict(max_memory), no_split, match_accelerate=True)
            assert without_uncovered_buffers(ours, want) == want, (max_memory, no_split)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert get_balanced_memory(model, dict(max_memory), no_split) == acc_balanced(model, dict(max_memory), no_split)
                assert get_balanced_memory(model, dict(max_memory), no_split, low_zero=True) == acc_balanced(
                    model, dict(max_memory), no_split, low_zero=True
                )


def without_uncovered_buffers(ours: dict, theirs: dict) -> dict:
    """``ours`` less the entries accelerate never makes: direct buffers of a module it split (see the test below)."""
    from shardkit.bigmodel.devicemap import device_for

    return {k: v for k, v in ours.items() if k in theirs or device_for(k, theirs) is not None}


def test_split_modules_keep_their_direct_buffers():
    """Deliberate: when accelerate splits a module it queues its parameters and children but not its buffers, so
    BERT's embeddings.position_ids / token_type_ids get no device (accelerate #4014); shardkit places them."""
    model = build("bert", empty=True)
    max_memory = {0: 19929, 1: 19929, "cpu": 132864}
    theirs = accelerate_map(model, max_memory, None)
    ours = infer_auto_device_map(model, max_memory, None, match_accelerate=True)
    from shardkit.bigmodel.devicemap import device_for

    assert device_for("embeddings.position_ids", theirs) is None
    assert ours["embeddings.position_ids"] == ours["embeddings.token_type_ids"] == "cpu"
    check_device_map(model, ours)


@pytest.mark.parametrize("kind", KINDS)
def test_sizes_and_tied_parameters_match_accelerate(kind):
    model = build(kind, empty=True)
    assert dict(compute_module_sizes(model)) == dict(acc_sizes(model))
    assert dict(compute_module_sizes(model, dtype=torch.float16)) == dict(
        acc_sizes(model, dtype=torch.float16)
    )  # shrinking casts agree
    assert find_tied_parameters(model) == acc_tied(model)


def test_tied_embeddings_are_found_and_placed_together():
    model = build("gpt2", empty=True)
    assert find_tied_parameters(model) == [["lm_head.weight", "transformer.wte.weight"]]
    total = compute_module_sizes(model)[""]
    for max_memory in budgets(total):
        device_map = infer_auto_device_map(model, max_memory, model._no_split_modules, clean_result=False)
        from shardkit.bigmodel.devicemap import device_for

        assert device_for("lm_head.weight", device_map) == device_for("transformer.wte.weight", device_map)


def test_no_reserve_when_nothing_is_offloaded():
    """Deliberate: accelerate always holds back the largest layer on GPU 0, so a model that fits on two GPUs gets
    pushed onto the CPU anyway (accelerate #1888, #3041); shardkit holds room only for streaming that happens."""
    model = build("llama", empty=True)
    total = compute_module_sizes(model)[""]
    max_memory = {0: total // 2, 1: total * 7 // 10, "cpu": total}
    ours = infer_auto_device_map(model, max_memory, model._no_split_modules)
    assert set(ours.values()) == {0, 1}
    assert "cpu" in accelerate_map(model, max_memory, model._no_split_modules).values()


def test_offloading_reserves_the_dispatchers_two_staging_slabs():
    """Deliberate: the dispatcher streams offloaded layers through two slabs of the largest layer on the main GPU
    (one computing, one being filled), so that is what is held back once anything is offloaded, not one layer."""
    model = build("llama", empty=True)
    sizes = compute_module_sizes(model)
    layer = sizes["model.layers.0"]
    largest = max(layer, sizes["lm_head"], sizes["model.embed_tokens"])
    no_split = set(model._no_split_modules)
    tree, tied = module_tree(model), find_tied_parameters(model)
    checked_difference = False
    for gpu in range(largest, sizes[""], layer // 3):
        max_memory = {0: gpu, "cpu": sizes[""] * 2}
        ours = infer_auto_device_map(model, max_memory, model._no_split_modules)
        if set(ours.values()) == {0}:
            continue
        if 0 not in ours.values():  # room for nothing beside the slabs: the GPU is left out, the CPU runs the model
            assert ours == {"": "cpu"}
            continue
        spanning = placement.spanning_modules(tree, no_split)
        raw = placement.greedy(tree, sizes, max_memory, no_split, tied, {0: 2}, spanning=spanning)
        offloaded = lambda device: device in ("cpu", "disk")  # noqa: E731
        assert ours == placement.expand_offloaded(placement.clean_device_map(raw), tree, spanning, offloaded)
        assert "model.layers" not in ours and "" not in ours  # offloaded entries stay one per streamed block
        on_gpu = sum(sizes[k] for k, d in ours.items() if d == 0)
        assert on_gpu == 0 or on_gpu + 2 * largest <= gpu  # nothing fits next to the two slabs: the GPU stays free for them
        theirs = accelerate_map(model, max_memory, model._no_split_modules)
        checked_difference |= ours != theirs
    assert checked_difference


def test_disk_offload_with_a_gpu_also_reserves_the_cpu_read_ring():
    model = build("llama", empty=True)
    sizes = compute_module_sizes(model)
    layer = sizes["model.layers.0"]
    max_memory = {0: sizes["model.embed_tokens"] + 3 * layer, "cpu": 2 * layer}
    device_map = infer_auto_device_map(model, max_memory, model._no_split_modules)
    assert {0, "disk"} <= set(device_map.values())
    on_cpu = sum(sizes[k] for k, d in device_map.items() if d == "cpu")
    largest_on_disk = max(sizes[k] for k, d in device_map.items() if d == "disk")
    piece, count = disk_ring(largest_on_disk)
    assert on_cpu <= 2 * layer - piece * count  # tiny blocks: the ring is two of them


def test_a_cpu_run_holds_one_staging_block_not_two():
    """Issue 11 item 4: with half the model's bytes as CPU budget and no GPU, blocks stay on the CPU (two held-back
    blocks used to eat the budget: ``{'': 'disk'}``); the CPU runs disk blocks through one slab."""
    model = build("llama", empty=True)
    sizes = compute_module_sizes(model)
    largest = max(sizes["model.layers.0"], sizes["lm_head"])
    device_map = infer_auto_device_map(model, {"cpu": sizes[""] // 2}, model._no_split_modules)
    assert device_map != {"": "disk"} and "cpu" in device_map.values()
    on_cpu = sum(sizes[k] for k, d in device_map.items() if d == "cpu")
    assert 0 < on_cpu <= sizes[""] // 2 - largest


def test_a_cpu_budget_larger_than_the_disk_ring_keeps_blocks_on_the_cpu():
    """With a GPU, disk blocks reach it through a fixed pinned ring (256 MiB), not two whole blocks: a CPU budget of
    1.75 layers of 400 MB still holds a layer (two held-back layers of 800 MB used to push everything to disk)."""
    layer, layers = 400 * 10**6, 10
    root = placement.Node("", "Model", [placement.Node("layers", "ModuleList", [])])
    sizes = {"": layer * layers, "layers": layer * layers}
    for i in range(layers):
        name = f"layers.{i}"
        root.children[0].children.append(placement.Node(name, "Layer", [placement.Node(f"{name}.weight", None)]))
        sizes[name] = sizes[f"{name}.weight"] = layer
    device_map = placement.plan(root, sizes, {0: 3 * layer, "cpu": layer * 7 // 4}, {"Layer"}, [])
    piece, count = disk_ring(layer)
    assert piece * count == 256 * 2**20
    assert list(device_map.values()).count("cpu") == 1 and "disk" in device_map.values()
    assert list(device_map.values()).count(0) == 1  # and two staging slabs beside it on the GPU
    assert placement.memory_needs(root, sizes, device_map, {"Layer"})["host"]["run"] == layer + 256 * 2**20


def test_dtype_that_grows_tensors_is_counted_at_its_real_size():
    """Deliberate: accelerate sizes with min(dtype, own dtype), so an fp16 model loaded as fp32 is planned at half
    its size and overflows the GPU; shardkit counts the cast it will do."""
    with init_empty_weights():
        model = build("llama").half()
    fp16 = compute_module_sizes(model)[""]
    assert compute_module_sizes(model, dtype=torch.float32)[""] == 2 * fp16
    assert acc_sizes(model, dtype=torch.float32)[""] == fp16
    max_memory = {0: int(fp16 * 1.5), "cpu": 10 * fp16}
    assert "cpu" in infer_auto_device_map(model, max_memory, model._no_split_modules, dtype=torch.float32).values()
    assert set(accelerate_map_dtype(model, max_memory, torch.float32).values()) == {0}


def accelerate_map_dtype(model, max_memory, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return acc_infer(model, max_memory=dict(max_memory), no_split_module_classes=model._no_split_modules, dtype=dtype)


def test_device_map_strings():
    model = build("llama", empty=True)
    total = compute_module_sizes(model)[""]
    roomy = {0: total, 1: total, "cpu": total}
    balanced = resolve_device_map(model, "balanced", dict(roomy), model._no_split_modules)
    assert {0, 1} <= set(balanced.values())
    assert resolve_device_map(model, "auto", dict(roomy), model._no_split_modules) == balanced
    assert resolve_device_map(model, "sequential", dict(roomy), model._no_split_modules) == {"": 0}
    low0 = resolve_device_map(model, "balanced_low_0", dict(roomy), model._no_split_modules)
    assert sum(compute_module_sizes(model)[k] for k, d in low0.items() if d == 0) < sum(
        compute_module_sizes(model)[k] for k, d in balanced.items() if d == 0
    )
    with pytest.raises(UsageError, match="unknown device_map 'fastest'"):
        resolve_device_map(model, "fastest")


def test_max_memory_keys_and_sizes():
    assert placement.normalize_max_memory({"cpu": "1GiB", "cuda:1": "2GB", 0: 5, "disk": 1}) == {
        0: 5,
        1: 2 * 10**9,
        "cpu": 2**30,
        "disk": 1,
    }
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        placement.normalize_max_memory({"tpu": "1GB"})
    with pytest.raises(UsageError, match="ambiguous"):
        placement.normalize_max_memory({"cpu": "1G"})


def test_check_device_map_errors_name_the_module():
    model = build("llama", empty=True)
    with pytest.warns(UserWarning, match="'model.decoder'"):  # accelerate warns about keys naming nothing
        check_device_map(model, {"": "cpu", "model.decoder": 0})
    with pytest.raises(UsageError, match="any device for the following parameters: 'lm_head.weight'"):
        check_device_map(model, {"model": "cpu"})
    with pytest.raises(UsageError, match="device 'gpu0'"):
        check_device_map(model, {"": "gpu0"})
    check_device_map(model, {"model": 0, "lm_head.weight": "cpu"})


def test_init_empty_weights_keeps_buffers_and_parameter_attributes():
    class Tagged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(3))
            self.weight.tag = "kept"
            self.register_buffer("table", torch.arange(3.0))

    with init_empty_weights():
        module = Tagged()
    assert module.weight.device.type == "meta" and module.weight.tag == "kept"
    assert module.table.device.type == "cpu"
    with init_empty_weights(include_buffers=True):
        module = Tagged()
    assert module.table.device.type == "meta"
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # patched only inside the context


def test_staging_room_is_held_on_the_gpu_the_offloaded_blocks_run_on():
    """A first GPU too small for anything beside the two staging slabs is left out, so the next GPU, which then
    runs the offloaded blocks, is the one that holds their room (instead of slabs landing beyond its budget)."""
    import copy

    import transformers
    from bigmodels import configs

    config = copy.deepcopy(configs()["llama"][1])
    config.num_hidden_layers = 8
    with init_empty_weights():
        model = transformers.LlamaForCausalLM(config).eval()
    sizes = compute_module_sizes(model)
    largest = max(sizes["model.layers.0"], sizes["lm_head"], sizes["model.embed_tokens"])
    for first in (largest, 2 * largest, 2 * largest + sizes["model.embed_tokens"] - 1):
        max_memory = {0: first, 1: 4 * largest, "cpu": sizes[""] * 2}
        ours = infer_auto_device_map(model, max_memory, model._no_split_modules)
        assert 0 not in ours.values() and 1 in ours.values() and "cpu" in ours.values()
        on_main = sum(sizes[k] for k, d in ours.items() if d == 1)
        assert on_main + 2 * largest <= max_memory[1]
    roomy = infer_auto_device_map(model, {0: 4 * largest, 1: 4 * largest, "cpu": sizes[""] * 2}, model._no_split_modules)
    assert 0 in roomy.values() and 1 in roomy.values() and "cpu" in roomy.values()
