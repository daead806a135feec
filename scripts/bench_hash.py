#!/usr/bin/env python
"""Benchmark shardkit's threaded SHA-256 (``shardkit.hashing``) against ``sha256sum`` over the same files.

Writes ``--files`` random files of ``--size`` each, warms the page cache (one read of each), then times, per
round, ``sha256sum`` over all files, shardkit with 1 thread (one file at a time, read-ahead only) and shardkit
with one thread per core. Warm cache measures the hashing, which is what the CPU can speed up; the digests of
both tools are compared. Prints the median of ``--repeat`` rounds, MB/s, and the ratio to sha256sum.

    python scripts/bench_hash.py                     # 4 x 64 MiB, for development
    python scripts/bench_hash.py --full              # 4 x 1 GiB (peak RSS stays ~ threads x 16 MiB)

Target (issue 16): at least as fast as sha256sum on a 2-core machine, faster with more cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shardkit.hashing import default_workers, sha256_files  # noqa: E402
from shardkit.units import parse_size  # noqa: E402


def make_files(folder: Path, count: int, size: int) -> list[Path]:
    paths = []
    block = os.urandom(1 << 20)
    for i in range(count):
        path = folder / f"shard-{i}.bin"
        with open(path, "wb") as handle:
            left = size
            while left:
                n = min(left, len(block))
                handle.write(block[:n])
                left -= n
                block = block[1:] + block[:1]  # not the same MiB twice in a row
        paths.append(path)
    return paths


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def sha256sum(paths: list[Path]) -> dict[str, str]:
    out = subprocess.run(["sha256sum", *map(str, paths)], capture_output=True, text=True, check=True).stdout
    return {line.split(None, 1)[1].lstrip("*"): line.split()[0] for line in out.splitlines()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--size", default="64MiB", help="size of each file (default 64MiB)")
    parser.add_argument("--full", action="store_true", help="4 files of 1 GiB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the files (default: a temp folder)")
    args = parser.parse_args()
    size = parse_size("1GiB" if args.full else args.size)
    if shutil.which("sha256sum") is None:
        sys.exit("sha256sum is not installed")

    folder = Path(tempfile.mkdtemp(prefix="bench-hash-", dir=args.dir))
    try:
        paths = make_files(folder, args.files, size)
        sha256sum(paths)  # warm the page cache
        total = args.files * size
        cases = {
            "sha256sum": lambda: sha256sum(paths),
            "shardkit 1 thread": lambda: sha256_files(paths, workers=1),
            f"shardkit {default_workers()} threads": lambda: sha256_files(paths),
        }
        times: dict[str, list[float]] = {name: [] for name in cases}
        digests = {}
        for _ in range(args.repeat):
            for name, case in cases.items():
                seconds, digests[name] = timed(case)
                times[name].append(seconds)
        reference = digests["sha256sum"]
        for name, result in digests.items():
            if result != reference:
                sys.exit(f"{name}: digests differ from sha256sum's")
        base = statistics.median(times["sha256sum"])
        print(f"{args.files} files x {size / 2**20:.0f} MiB, warm page cache, {os.cpu_count()} cores, median of {args.repeat}")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"  {name:<22} {median:7.3f} s  {total / median / 1e6:8.0f} MB/s  {base / median:5.2f}x sha256sum")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
