"""accelerate-compatible behaviours that only a GPU shows (issue 11): run by the lead on the GPU machine."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
from test_bigmodel_compat import X, _outer  # noqa: E402

from shardkit.bigmodel import cpu_offload, disk_offload, dispatch_model, remove_hook_from_module  # noqa: E402

pytestmark = pytest.mark.gpu


def test_offload_of_a_cpu_model_runs_on_the_cpu_by_default(tmp_path):
    model = _outer()
    want = model(X)
    cpu_offload(model)  # accelerate: the first parameter's device, not GPU 0
    assert model._hf_hook.execution_device == torch.device("cpu")
    torch.testing.assert_close(model(X), want)
    model = _outer()
    disk_offload(model, tmp_path)
    assert model.first._hf_hook.execution_device == torch.device("cpu")
    torch.testing.assert_close(model(X), want)


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload"])
def test_gpu_offload_then_remove_hooks_leaves_a_cpu_model(how, tmp_path):
    model = _outer()
    want = model(X)
    if how == "cpu_offload":
        cpu_offload(model, execution_device="cuda:0")
    else:
        disk_offload(model, tmp_path, execution_device="cuda:0")
    assert model.first._hf_hook.offload and model.first._hf_hook.execution_device == torch.device("cuda:0")
    torch.testing.assert_close(model(X.cuda()).cpu(), want)
    remove_hook_from_module(model, recurse=True)
    assert {t.device.type for t in model.parameters()} == {"cpu"}
    torch.testing.assert_close(model(X), want)


@pytest.mark.parametrize("tier", ["cpu", "disk"])
def test_deepcopy_of_a_model_streaming_to_a_gpu(tier, tmp_path):
    model = _outer()
    want = model(X)
    dispatch_model(model, {"first": tier, "norm": 0, "second": tier}, offload_dir=tmp_path)
    copied = copy.deepcopy(model)
    assert copied._shardkit_streamer is not model._shardkit_streamer
    torch.testing.assert_close(copied(X).cpu(), want)
    torch.testing.assert_close(model(X).cpu(), want)
    with pytest.raises(RuntimeError, match="offloaded"):
        copied.to("cuda:0")


def test_preload_module_classes_on_a_gpu(tmp_path):
    model = _outer()
    want = model(X)
    device_map = {"first.inner.0": "cpu", "norm": 0, "second.inner": "disk"}
    dispatch_model(model, device_map, offload_dir=tmp_path, preload_module_classes=["ReadsChildWeights"])
    torch.testing.assert_close(model(X.cuda()).cpu(), want)
