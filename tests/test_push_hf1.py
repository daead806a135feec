"""The push flows again with huggingface_hub 1.x, whose HTTP stack (httpx, not httpx2) and create_repo differ.

Set ``SHARDKIT_HF1_PATH`` to a folder holding huggingface_hub 1.x, e.g.
``pip install --no-deps --target /tmp/hf1 'huggingface_hub==1.33.*'`` (its other dependencies are the global
ones); this test reruns tests/test_push.py with that folder first on the path, in process and in the children.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cli_helpers import ROOT

HF1 = os.environ.get("SHARDKIT_HF1_PATH")


@pytest.mark.skipif(not HF1, reason="SHARDKIT_HF1_PATH (a folder with huggingface_hub 1.x) is not set")
def test_push_flows_with_huggingface_hub_1x():
    env = dict(os.environ, PYTHONPATH=f"{HF1}{os.pathsep}{ROOT}", SHARDKIT_HF_PATH=HF1)
    env.pop("SHARDKIT_HF1_PATH")
    version = subprocess.run(
        [sys.executable, "-c", "import huggingface_hub; print(huggingface_hub.__version__)"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert version.startswith("1."), version
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:warnings",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests" / "test_push.py"),
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-4000:]
