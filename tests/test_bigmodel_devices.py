"""Devices the machine lacks: a load's max_memory drops them with a warning, a device map naming one is a one-line
error, and planning (the library's and ``shardkit plan``'s) still plans for them, noting it."""

from __future__ import annotations

import warnings

import orjson
import pytest
import torch
from bigmodels import build, run, save
from click.testing import CliRunner

from shardkit import UsageError, infer_auto_device_map, load_checkpoint_and_dispatch
from shardkit.bigmodel import devicemap
from shardkit.cli import main
from shardkit.cli import plan as plan_cli


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = build("llama")
    return save(model, tmp_path_factory.mktemp("llama")), run(model, "llama")


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has ``n`` GPUs (set ``gpus.count``); CUDA itself is never asked."""

    class Count:
        count = 0

    monkeypatch.setattr(devicemap, "gpu_count", lambda: Count.count)
    monkeypatch.setattr(plan_cli, "visible_gpus", lambda: Count.count)
    return Count


def test_readme_snippet_without_a_gpu_loads_on_cpu_and_disk(llama, gpus, tmp_path):
    folder, want = llama
    with pytest.warns(UserWarning, match=r"max_memory names GPU 0, but .*: planning without it"):
        model = load_checkpoint_and_dispatch(
            build("llama", empty=True),
            folder,
            device_map="auto",
            max_memory={0: "20GiB", "cpu": "64GiB"},
            offload_folder=tmp_path,
        )
    assert set(model.hf_device_map.values()) == {"cpu"}
    assert torch.equal(run(model, "llama"), want)


def test_only_absent_gpus_are_dropped(gpus):
    gpus.count = 1
    with pytest.warns(UserWarning, match=r"max_memory names GPU 2, GPU 3, but this machine has 1 GPU \(0 to 0\)"):
        budget = devicemap.present_max_memory({0: 100, 2: 100, "cuda:3": 100, "cpu": 50})
    assert budget == {0: 100, "cpu": 50}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert devicemap.present_max_memory({"cpu": "1GB", "disk": 10}) == {"cpu": 10**9, "disk": 10}


@pytest.mark.parametrize(
    ("device_map", "count", "message"),
    [
        ({"": 0}, 0, "device_map puts the whole model on GPU 0, but "),
        ({"model": "cuda:1", "lm_head": "cpu"}, 1, r"device_map puts 'model' on GPU 1, but this machine has 1 GPU \(0 to 0\)"),
        ({"model": torch.device("cuda"), "lm_head": "cpu"}, 0, "device_map puts 'model' on GPU 0"),
    ],
)
def test_a_device_map_naming_an_absent_gpu_is_a_one_line_error(llama, gpus, device_map, count, message):
    folder, _ = llama
    gpus.count = count
    with pytest.raises(UsageError, match=message) as caught:
        load_checkpoint_and_dispatch(build("llama", empty=True), folder, device_map=device_map)
    assert "\n" not in str(caught.value)
    assert caught.value.code == "usage"


def test_dispatch_refuses_an_absent_execution_device(llama, gpus):
    from shardkit import dispatch_model, load_checkpoint_in_model

    folder, _ = llama
    model = build("llama", empty=True)
    load_checkpoint_in_model(model, folder, device_map={"": "cpu"})
    with pytest.raises(UsageError, match="main_device runs the offloaded blocks on GPU 0, but"):
        dispatch_model(model, {"": "cpu"}, main_device=0, force_hooks=True)


def test_planning_functions_still_plan_for_any_gpu(gpus):
    """accelerate's own tests plan for GPUs 0 and 1 on CPU machines: infer_auto_device_map must keep doing that."""
    model = build("llama", empty=True)
    device_map = infer_auto_device_map(model, {0: 60_000, 1: 200_000, "cpu": 10**9}, model._no_split_modules)
    assert {0, 1} <= set(device_map.values())


def test_plan_notes_a_gpu_the_machine_lacks(llama, gpus):
    folder, _ = llama
    runner = CliRunner()
    result = runner.invoke(main, ["plan", str(folder), "--max-memory", "0=100KB,cpu=60KB", "--json"])
    assert result.exit_code == 0, result.output
    data = orjson.loads(result.stdout)
    assert 0 in data["device_map"].values()  # a plan for a GPU machine elsewhere is still made
    assert data["notes"][:1] == [
        "planned for GPU 0, which this machine lacks (no CUDA GPU): a load here with this budget drops it, "
        "with a warning, and plans on the CPU and disk"
    ]
    text = runner.invoke(main, ["plan", str(folder), "--max-memory", "0=100KB,cpu=60KB"])
    assert text.exit_code == 0 and "note: planned for GPU 0, which this machine lacks" in text.stderr
    gpus.count = 1
    data = orjson.loads(runner.invoke(main, ["plan", str(folder), "--max-memory", "0=100KB,cpu=60KB", "--json"]).stdout)
    assert not [note for note in data["notes"] if "lacks" in note]


def test_visible_gpus_reads_the_driver_without_torch(monkeypatch, tmp_path):
    """The headers plan never imports torch: the count comes from the NVIDIA driver's /proc entries."""
    import subprocess
    import sys

    code = "import sys; from shardkit.cli.plan import visible_gpus; n = visible_gpus(); print(n, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "False"
    assert int(out[0]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


@pytest.fixture
def no_cuda_allowed(monkeypatch):
    """Every way shardkit could touch CUDA or pin memory raises: a CPU/disk map must take none of them (on a GPU
    machine, creating a context and pinning cost ~100 MB of host memory each, which the memory tests measured)."""
    from shardkit.bigmodel import slab

    def forbidden(*args, **kwargs):
        raise AssertionError("a CPU/disk map reached CUDA or pinned memory")

    for name in ("_lazy_init", "is_available", "device_count", "synchronize", "current_stream", "Stream", "Event"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    monkeypatch.setattr(slab, "_pinned", forbidden)
    monkeypatch.setattr(torch.Tensor, "pin_memory", forbidden)


@pytest.mark.parametrize(
    "how",
    [{"device_map": {"": "cpu"}}, {"device_map": {"": "disk"}}, {"device_map": "auto", "max_memory": {"cpu": 60_000}}],
    ids=["cpu", "disk", "auto-cpu-disk"],
)
@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_a_map_without_gpus_never_touches_cuda_or_pins(llama, tmp_path, no_cuda_allowed, how, dtype):
    folder, want = llama
    model = load_checkpoint_and_dispatch(
        build("llama", empty=True), folder, offload_folder=tmp_path, dtype=dtype, force_hooks=True, **how
    )
    assert "cuda" not in {str(d) for d in model.hf_device_map.values()}
    out = run(model, "llama")
    if dtype is None:
        assert torch.equal(out, want)
    assert torch.equal(run(model, "llama"), out)
