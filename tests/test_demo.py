"""The README's demo command runs the main job end to end and passes its own checks."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_demo_runs_end_to_end_and_removes_its_temporary_folder(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    result = subprocess.run(
        [sys.executable, "scripts/demo.py"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env=dict(os.environ, TMPDIR=str(temp)),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.rstrip().endswith("demo: all steps passed")
    assert "ok: outputs are bit-identical to transformers' own model" in result.stdout
    assert f"outputs: {temp}" in result.stdout
    assert not list(temp.glob("shardkit-demo-*"))  # without --workdir nothing is left behind


def test_a_failing_demo_removes_its_temporary_folder_too(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    code = (
        "import runpy\n"
        "demo = runpy.run_path('scripts/demo.py', run_name='demo')\n"
        "def stop(*args):\n"
        "    raise SystemExit('demo: stopped')\n"
        "demo['main'].__globals__['shardkit'] = stop\n"
        "demo['main']()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, TMPDIR=str(temp))
    )
    assert result.returncode == 1 and "demo: stopped" in result.stderr
    assert "outputs: " + str(temp) in result.stdout and not list(temp.glob("shardkit-demo-*"))
