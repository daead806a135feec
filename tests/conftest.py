import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        gpus = 0
    for item in items:
        if "gpu" in item.keywords and gpus < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multigpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs two CUDA GPUs"))


@pytest.fixture
def minilm():
    from builders import minilm_dir

    return minilm_dir()


@pytest.fixture(scope="session")
def dcp_folders(tmp_path_factory):
    """DCP folders saved by 4 gloo ranks (see tests/dcp_builders.py), built once per session: process groups
    start slowly. Returns the folder holding ``fsdp``, ``tp``, ``st`` and torch's reassembly ``fsdp.pt``, ``tp.pt``."""
    import os
    import subprocess

    reuse = os.environ.get("SHARDKIT_TEST_DCP_DIR")  # development: folders built earlier by dcp_builders.py
    if reuse and (Path(reuse) / "tp.pt").exists():
        return Path(reuse)
    out = tmp_path_factory.mktemp("dcp")
    script = Path(__file__).parent / "dcp_builders.py"
    result = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out
