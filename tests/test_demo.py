"""The README's demo command runs the main job end to end and passes its own checks."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_demo_runs_end_to_end(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/demo.py", "--workdir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout.rstrip().endswith("demo: all steps passed")
    assert "ok: outputs are bit-identical to transformers' own model" in result.stdout
