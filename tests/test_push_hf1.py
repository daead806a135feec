"""The push flows again with huggingface_hub 1.x, whose HTTP stack (httpx, not httpx2) and create_repo differ.

``SHARDKIT_HF1_PATH`` names a folder holding huggingface_hub 1.x (its other dependencies are the global ones);
without it the test installs one there itself, ``pip install --no-deps --target DIR 'huggingface_hub==1.33.*'``
(a few seconds from PyPI), and skips only where pip cannot reach the registry. It reruns tests/test_push.py with
that folder first on the path, in process and in the children.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cli_helpers import ROOT

HF1_SPEC = "huggingface_hub==1.33.*"


@pytest.fixture(scope="session")
def hf1(tmp_path_factory) -> str:
    """A folder holding huggingface_hub 1.x: ``SHARDKIT_HF1_PATH``, else one installed now."""
    given = os.environ.get("SHARDKIT_HF1_PATH")
    if given:
        return given
    folder = tmp_path_factory.mktemp("hf1")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(folder), HF1_SPEC],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if installed.returncode != 0:
        pytest.skip(f"could not install {HF1_SPEC} (set SHARDKIT_HF1_PATH): {installed.stderr.strip()[-300:]}")
    return str(folder)


def test_push_flows_with_huggingface_hub_1x(hf1):
    env = dict(os.environ, PYTHONPATH=f"{hf1}{os.pathsep}{ROOT}", SHARDKIT_HF_PATH=hf1)
    env.pop("SHARDKIT_HF1_PATH", None)
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
