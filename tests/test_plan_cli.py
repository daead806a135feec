"""``shardkit plan``: device maps from checkpoint headers alone (no torch) or from a transformers config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from bigmodels import build, save
from click.testing import CliRunner

from shardkit.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return save(build("llama"), tmp_path_factory.mktemp("llama"))


def plan(*args):
    result = CliRunner().invoke(main, ["plan", *map(str, args)])
    return result


def test_headers_plan_groups_repeated_blocks(llama):
    result = plan(llama, "--max-memory", "0=100KB,cpu=60KB", "--json")
    assert result.exit_code == 0, result.output
    data = orjson.loads(result.output)
    assert data["source"] == "headers"
    device_map = data["device_map"]
    # Layers are never split: every key is a whole layer or lies outside the layers.
    assert all(not k.startswith("model.layers.") or k.count(".") == 2 for k in device_map)
    assert list(device_map)[0] == "model.embed_tokens" and device_map["model.embed_tokens"] == 0
    assert sum(data["bytes"].values()) == data["total_bytes"]


def test_headers_plan_matches_the_config_plan(llama):
    """Without the model, names give the same tree (the computed rotary buffer aside) and so the same map."""
    for budget in ("0=100KB,cpu=60KB", "0=200KB", "cpu=50KB", "0=60KB,1=60KB,cpu=1GB"):
        for dtype in ([], ["--dtype", "bf16"]):
            headers = orjson.loads(plan(llama, "--max-memory", budget, "--json", *dtype).output)
            config = orjson.loads(
                plan(llama, "--max-memory", budget, "--json", "--model-config", llama / "config.json", *dtype).output
            )
            assert config["source"] == "config"
            assert {k: v for k, v in config["device_map"].items() if k != "model.rotary_emb"} == headers["device_map"], budget


def test_dtype_changes_the_sizes(llama):
    fp32 = orjson.loads(plan(llama, "--max-memory", "cpu=1GB", "--json").output)
    bf16 = orjson.loads(plan(llama, "--max-memory", "cpu=1GB", "--json", "--dtype", "bf16").output)
    assert fp32["device_map"] == bf16["device_map"] == {"": "cpu"}
    assert bf16["total_bytes"] * 2 == fp32["total_bytes"]


def test_human_output(llama):
    result = plan(llama, "--max-memory", "0=100KB,cpu=60KB")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split() == ["model.embed_tokens", "0", "16.38", "kB"]
    assert lines[1].split()[:2] == ["model.layers.0", "disk"]  # offloaded entries: one per streamed block
    assert "(16,384 bytes)" in result.output


def test_bad_max_memory_is_one_line_error(llama):
    for bad in ("0:20GB", "tpu=1GB", "cpu=1G", ""):
        result = plan(llama, "--max-memory", bad)
        assert result.exit_code == 2
        assert "shardkit: error:" in result.output


def test_headers_plan_never_imports_torch(llama):
    code = (
        "import sys\n"
        "from shardkit.cli import main\n"
        f"sys.argv = ['shardkit', 'plan', {str(llama)!r}, '--max-memory', '0=100KB,cpu=60KB', '--json']\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert '"source": "headers"' in result.stdout


def test_import_shardkit_stays_torch_free():
    code = "import sys, shardkit, shardkit.bigmodel; shardkit.bigmodel.__all__; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)


def test_plan_prints_the_host_memory_it_expects(llama):
    """Issue 11 item 5: the budget can be checked against what a load will hold, staging and read buffers included."""
    from shardkit.bigmodel.readahead import PARALLEL_DEPTH, PARALLEL_PIECE, disk_ring

    data = orjson.loads(plan(llama, "--max-memory", "cpu=60KB", "--json").stdout)
    sizes = {k: v for k, v in data["bytes"].items()}
    host = data["memory"]["host"]
    layer = 37120  # a LlamaDecoderLayer of the tiny model, fp32: the largest block on disk
    assert host["weights"] == sizes["cpu"] and host["staging"] == layer and host["disk_ring"] == 0
    assert host["load_buffers"] == 0  # safetensors in their own dtype: CPU tensors read in place, disk ones not read
    assert host["run"] == host["weights"] + layer <= 60_000
    assert data["memory"]["gpus"] == {}

    data = orjson.loads(plan(llama, "--max-memory", "0=100KB,cpu=60KB", "--json").stdout)
    host, gpu = data["memory"]["host"], data["memory"]["gpus"]["0"]
    piece, count = disk_ring(layer)
    assert host["disk_ring"] == piece * count and host["staging"] == 0
    assert host["load_buffers"] == PARALLEL_DEPTH * min(PARALLEL_PIECE, 16384)  # pinned ring, 16 pieces of the largest tensor
    assert gpu["staging"] == 2 * layer and gpu["total"] == gpu["weights"] + 2 * layer <= 100_000

    text = plan(llama, "--max-memory", "cpu=60KB")
    assert "host memory: " in text.stdout and "staging slab" in text.stdout and "while loading" in text.stdout


def test_plan_device_map_is_what_the_cli_prints(llama):
    """The library call and ``shardkit plan --json`` give the same map and per-device totals."""
    import shardkit

    for model_config in (None, llama / "config.json"):
        planned = shardkit.plan_device_map(llama, {"0": "100KB", "cpu": "60KB"}, model_config=model_config)
        extra = ["--model-config", model_config] if model_config else []
        data = orjson.loads(plan(llama, "--max-memory", "0=100KB,cpu=60KB", "--json", *extra).output)
        assert planned.device_map == data["device_map"] and planned.per_device == data["bytes"]
        assert planned.total_bytes == data["total_bytes"] > 0 and planned.source == data["source"]
        assert orjson.loads(orjson.dumps(planned.memory, option=orjson.OPT_NON_STR_KEYS)) == data["memory"]
