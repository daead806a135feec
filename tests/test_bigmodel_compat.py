"""accelerate-compatible behaviours of the big-model API that accelerate users rely on (issue 11)."""

from __future__ import annotations

import threading

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from shardkit.bigmodel import init_empty_weights, init_on_device  # noqa: E402


@pytest.mark.parametrize("include_buffers", [False, True])
def test_init_empty_weights_leaves_other_threads_alone(include_buffers):
    inside, built, done = threading.Event(), {}, threading.Event()

    def other_thread():
        inside.wait(10)
        built["module"] = nn.BatchNorm1d(4)
        done.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer
    with init_empty_weights(include_buffers=include_buffers):
        assert nn.Module.register_parameter is register_parameter and nn.Module.register_buffer is register_buffer
        inside.set()
        assert done.wait(10)
        mine = nn.BatchNorm1d(4)
    worker.join()
    theirs = built["module"]
    assert theirs.weight.device.type == "cpu" and theirs.running_mean.device.type == "cpu"
    assert mine.weight.device.type == "meta"
    assert mine.running_mean.device.type == ("meta" if include_buffers else "cpu")
    after = nn.BatchNorm1d(4)
    assert after.weight.device.type == "cpu" and after.running_mean.device.type == "cpu"


def test_init_on_device_nests_and_keeps_parameter_attributes():
    with init_empty_weights():
        with init_on_device("cpu"):
            inner = nn.Linear(2, 2)
        outer = nn.Linear(2, 2)
    assert inner.weight.device.type == "cpu" and outer.weight.device.type == "meta"

    class Tagged(nn.Parameter):
        pass

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            param = Tagged(torch.ones(2))
            param.tag = "kept"
            self.p = param

    with init_empty_weights():
        holder = Holder()
    assert type(holder.p) is Tagged and holder.p.tag == "kept" and holder.p.device.type == "meta"


def test_buffers_registered_from_existing_tensors_move_with_include_buffers():
    class WithBuffer(nn.Module):
        def __init__(self, table):
            super().__init__()
            self.register_buffer("table", table)

    table = torch.arange(4.0)  # built outside the context
    with init_empty_weights(include_buffers=True):
        module = WithBuffer(table)
    assert module.table.device.type == "meta"


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 5))


def test_folder_with_bin_parts_and_an_index_of_another_name(tmp_path):
    import json

    from shardkit.bigmodel import load_checkpoint_in_model

    model = _small_model()
    index = {}
    for i, prefix in enumerate(("0.", "1.", "2.")):
        part = {k: v for k, v in model.state_dict().items() if k.startswith(prefix)}
        torch.save(part, tmp_path / f"checkpoint_part{i}.bin")
        index.update({k: f"checkpoint_part{i}.bin" for k in part})
    (tmp_path / "weight_map.index.json").write_text(json.dumps(index))
    fresh = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 5))
    load_checkpoint_in_model(fresh, str(tmp_path))
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name


def test_usage_errors_are_value_errors():
    from shardkit import UsageError
    from shardkit.bigmodel import check_device_map, infer_auto_device_map

    model = _small_model()
    with pytest.raises(ValueError, match="does not give any device") as caught:
        check_device_map(model, {"0": "cpu", "2": "cpu"})
    assert isinstance(caught.value, UsageError) and caught.value.code == "usage"
    with pytest.raises(ValueError):
        infer_auto_device_map(model, max_memory={"tpu": 10})


def test_check_device_map_warns_about_keys_naming_nothing():
    from shardkit.bigmodel import check_device_map

    with pytest.warns(UserWarning, match="device_map keys do not match any submodules.*'nothing'"):
        check_device_map(_small_model(), {"": "cpu", "nothing": 0})


def test_include_buffers_default_reads_accelerates_switch(monkeypatch):
    monkeypatch.setenv("ACCELERATE_INIT_INCLUDE_BUFFERS", "1")
    with init_empty_weights():
        module = nn.BatchNorm1d(4)
    assert module.running_mean.device.type == "meta"
    monkeypatch.delenv("ACCELERATE_INIT_INCLUDE_BUFFERS")
    with init_empty_weights():
        module = nn.BatchNorm1d(4)
    assert module.running_mean.device.type == "cpu"


class ReadsChildWeights(nn.Module):
    """Its forward reads its child's weights without calling the child (accelerate's preload case)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(n_in, n_out))

    def forward(self, x):
        return x @ self.inner[0].weight.t() + self.inner[0].bias


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = ReadsChildWeights(3, 4)
        self.norm = nn.BatchNorm1d(4)
        self.second = ReadsChildWeights(4, 5)

    def forward(self, x):
        return self.second(self.norm(self.first(x)))


def _outer():
    torch.manual_seed(0)
    model = Outer().eval()
    model.norm.running_mean.uniform_()
    return model


X = torch.randn(2, 3)


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload", "dispatch_model"])
def test_preload_module_classes(how, tmp_path):
    from shardkit.bigmodel import cpu_offload, disk_offload, dispatch_model

    model = _outer()
    want = model(X)
    preload = ["ReadsChildWeights"]
    if how == "cpu_offload":
        cpu_offload(model, execution_device="cpu", preload_module_classes=preload)
    elif how == "disk_offload":
        disk_offload(model, tmp_path, execution_device="cpu", preload_module_classes=preload)
        assert model.first.inner[0].weight.device.type == "meta"
    else:  # map keys below the module that reads the weights: the preloaded class makes the block
        device_map = {"first.inner.0": "disk", "norm": "cpu", "second.inner": "disk"}
        dispatch_model(model, device_map, offload_dir=tmp_path, preload_module_classes=preload)
        assert model.first.inner[0].weight.device.type == "meta"
        assert model.first._hf_hook.offload and not hasattr(model.first.inner[0], "_hf_hook")
    torch.testing.assert_close(model(X), want)


def test_whole_model_offload_needs_no_preload_for_modules_over_leaves(tmp_path):
    from shardkit.bigmodel import disk_offload

    model = _outer()
    want = model(X)
    disk_offload(model, tmp_path, execution_device="cpu")
    assert model.first.inner[0].weight.device.type == "meta"
    torch.testing.assert_close(model(X), want)


def test_offload_defaults_to_the_first_parameters_device(tmp_path, monkeypatch):
    from shardkit.bigmodel import cpu_offload, disk_offload

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU must not be picked for a CPU model
    model = _outer()
    disk_offload(model, tmp_path)
    assert model.first._hf_hook.execution_device == torch.device("cpu")
    model = _outer()
    cpu_offload(model)
    assert model._hf_hook.execution_device == torch.device("cpu")


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload"])
def test_remove_hook_from_module_recurse_leaves_a_runnable_cpu_model(how, tmp_path):
    from shardkit.bigmodel import cpu_offload, disk_offload, remove_hook_from_module

    model = _outer()
    want = model(X)
    if how == "cpu_offload":
        cpu_offload(model, execution_device="cpu")
    else:
        disk_offload(model, tmp_path, execution_device="cpu")
    remove_hook_from_module(model, recurse=True)
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    assert not any("_hf_hook" in m.__dict__ or "forward" in m.__dict__ for m in model.modules())
    torch.testing.assert_close(model(X), want)


def test_accelerates_remove_hook_from_submodules_works_on_shardkit_hooks(tmp_path):
    hooks = pytest.importorskip("accelerate.hooks")
    from shardkit.bigmodel import disk_offload

    model = _outer()
    want = model(X)
    disk_offload(model, tmp_path, execution_device="cpu")
    hooks.remove_hook_from_submodules(model)
    assert model.first.inner[0].weight.device.type == "cpu"
    torch.testing.assert_close(model(X), want)


def test_tied_weights_stay_tied_when_hooks_are_removed(tmp_path):
    from shardkit.bigmodel import disk_offload, remove_hooks

    model = nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8, bias=False))
    model[1].weight = model[0].weight
    disk_offload(model, tmp_path, execution_device="cpu")
    remove_hooks(model)
    assert model[1].weight is model[0].weight and model[0].weight.device.type == "cpu"


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_deepcopy_of_a_dispatched_model(tier, tmp_path):
    import copy

    from shardkit.bigmodel import dispatch_model

    model = _outer()
    want = model(X)
    dispatch_model(model, {"first": tier, "norm": "cpu", "second": tier}, offload_dir=tmp_path, force_hooks=True)
    copied = copy.deepcopy(model)
    assert copied.first.forward is not model.first.forward
    if tier == "disk":
        assert copied._shardkit_streamer is not model._shardkit_streamer
        assert copied.first.inner[0].weight.device.type == "meta"
    torch.testing.assert_close(copied(X), want)
    torch.testing.assert_close(model(X), want)


def test_hf_hook_is_what_transformers_and_peft_read(tmp_path):
    from shardkit.bigmodel import disk_offload

    model = _outer()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    disk_offload(model, tmp_path, execution_device="cpu")
    hook = model.first._hf_hook
    assert hook.offload and hook.execution_device == torch.device("cpu") and not hook.offload_buffers
    assert set(hook.weights_map) == {"inner.0.weight", "inner.0.bias"}
    assert torch.equal(hook.weights_map["inner.0.weight"], state["first.inner.0.weight"])
    assert hook.original_devices == {"inner.0.weight": torch.device("meta"), "inner.0.bias": torch.device("meta")}
    # transformers' helper for saving offloaded models finds the value through the hook
    from transformers.integrations.accelerate import load_offloaded_parameter

    assert torch.equal(load_offloaded_parameter(model, "second.inner.0.bias"), state["second.inner.0.bias"])
    # pre_forward / post_forward alone make the weights available around other work, as PEFT uses them
    hook.pre_forward(model.first)
    assert model.first.inner[0].weight.device.type == "cpu"
    assert torch.equal(model.first.inner[0].weight, state["first.inner.0.weight"])
    hook.post_forward(model.first, None)
    assert model.first.inner[0].weight.device.type == "meta"


def test_load_checkpoint_and_dispatch_without_a_map_only_loads(tmp_path):
    from builders import save_safetensors

    from shardkit.bigmodel import load_checkpoint_and_dispatch

    reference = _outer()
    save_safetensors(reference.state_dict(), tmp_path / "model.safetensors")
    with init_empty_weights():
        model = Outer().eval()
    load_checkpoint_and_dispatch(model, tmp_path)
    assert not hasattr(model, "hf_device_map") and "_hf_hook" not in model.__dict__
    assert all(t.device.type == "cpu" for t in model.parameters())
    torch.testing.assert_close(model(X), reference(X))


def test_accelerates_other_parameters(tmp_path):
    from builders import save_safetensors

    from shardkit.bigmodel import load_checkpoint_and_dispatch, load_checkpoint_in_model

    reference = _outer()
    save_safetensors(reference.state_dict(), tmp_path / "model.safetensors")
    model = _outer()
    load_checkpoint_in_model(model, tmp_path, offload_8bit_bnb=True, full_state_dict=True, offload_state_dict=True)
    load_checkpoint_and_dispatch(model, tmp_path, device_map={"": "cpu"}, offload_state_dict=True, full_state_dict=True)
    with pytest.raises(ValueError, match="full_state_dict=False"):
        load_checkpoint_in_model(model, tmp_path, full_state_dict=False)
    with pytest.raises(ValueError, match="broadcast_from_rank0"):
        load_checkpoint_and_dispatch(model, tmp_path, broadcast_from_rank0=True)


def _three_linears():
    from collections import OrderedDict

    inner = nn.Sequential(OrderedDict([("a", nn.Linear(10, 4)), ("b", nn.Linear(4, 4)), ("c", nn.Linear(4, 8))]))
    return nn.Sequential(OrderedDict([("module", inner)]))  # a 176, b 80, c 160 bytes


def test_fallback_allocation_puts_something_on_a_device_that_would_stay_empty(caplog):
    import logging

    from shardkit.bigmodel import infer_auto_device_map

    model = _three_linears()
    with caplog.at_level(logging.INFO, logger="shardkit.bigmodel.devicemap"):
        plain = infer_auto_device_map(model, max_memory={0: 256}, match_accelerate=True)
    assert 0 not in plain.values() and "insufficient memory" in caplog.text and "- 0: 336 bytes required" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="shardkit.bigmodel.devicemap"):
        fallback = infer_auto_device_map(model, max_memory={0: 256}, fallback_allocation=True, match_accelerate=True)
    assert fallback == {"module.a": "disk", "module.b": 0, "module.c": "disk"}  # b fits beside one layer held back
    assert "insufficient memory" not in caplog.text
    # shardkit's own reserve (two staging slabs of the largest layer, 352 bytes) leaves no room at all on this GPU
    assert infer_auto_device_map(model, max_memory={0: 256}, fallback_allocation=True) == {"module": "disk"}


def test_buffers_of_offloaded_modules_that_do_not_fit_the_main_gpu_warn():
    import warnings

    from shardkit.bigmodel import infer_auto_device_map

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 5))
    for i, module in enumerate(model):
        module.register_buffer(f"extra{i}", torch.zeros(10, 2 if i == 0 else 3))
    # batch norm's statistics and extra (160 bytes) and the last linear's extra (120) would live on GPU 0
    with pytest.warns(UserWarning, match="Current model requires 280 bytes of buffer for offloaded layers"):
        device_map = infer_auto_device_map(model, max_memory={0: 400, "cpu": "1GB"}, match_accelerate=True)
    assert device_map == {"0": 0, "1": "cpu", "2": "cpu"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        infer_auto_device_map(model, max_memory={0: 400, "cpu": "1GB"}, match_accelerate=True, offload_buffers=True)
        infer_auto_device_map(model, max_memory={0: 4000, "cpu": "1GB"})  # everything fits: nothing offloaded
        infer_auto_device_map(model, max_memory={"cpu": 300})  # a CPU main device keeps buffers in host memory


def test_offload_store_is_a_read_only_mapping_of_cpu_tensors(tmp_path):
    from collections.abc import Mapping

    from shardkit.bigmodel import OffloadStore, disk_offload

    model = _outer()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    disk_offload(model, tmp_path, execution_device="cpu", offload_buffers=True)
    store = OffloadStore.open(tmp_path)
    assert isinstance(store, Mapping) and len(store) == len(list(store)) == len(state)
    assert set(store) == set(state) and "first.inner.0.weight" in store and "nothing" not in store
    for name, value in store.items():
        assert value.device.type == "cpu" and torch.equal(value, state[name]), name
    with pytest.raises(KeyError):
        store["nothing"]
    assert store == store and store != OffloadStore.open(tmp_path) and len({store}) == 1  # identity, hashable
    assert dict(store.items()).keys() == state.keys()


def test_moving_a_model_with_offloaded_blocks_is_refused_until_hooks_are_removed(tmp_path):
    from shardkit.bigmodel import dispatch_model, remove_hooks

    model = _outer()
    want = model(X)
    dispatch_model(model, {"first": "disk", "norm": "cpu", "second": "cpu"}, offload_dir=tmp_path)
    with pytest.raises(RuntimeError, match="offloaded to cpu or disk"):
        model.to("cpu")
    with pytest.raises(RuntimeError, match="offloaded to cpu or disk"):
        model.cuda()
    remove_hooks(model)
    assert model.to(torch.float64) is model and "to" not in model.__dict__
    torch.testing.assert_close(model(X.double()), want.double())


def test_a_deep_copy_guards_its_own_moves(tmp_path):
    import copy

    from shardkit.bigmodel import dispatch_model, remove_hooks

    model = _outer()
    dispatch_model(model, {"first": "disk", "norm": "cpu", "second": "cpu"}, offload_dir=tmp_path)
    copied = copy.deepcopy(model)
    remove_hooks(model)
    model.to(torch.float64)
    with pytest.raises(RuntimeError, match="offloaded"):
        copied.to(torch.float64)
