#!/usr/bin/env python
"""Benchmark ``shardkit validate --checksums`` (per-tensor SHA-256, no torch) against ``sha256sum`` of the same files.

Builds a sharded safetensors checkpoint of random bytes (``--tensors`` F32 tensors of ``--tensor-size`` each,
shards of ``--shard-size``), warms the page cache, then times per round, each as a whole process:

- ``sha256sum`` over the shard files (one digest per file: less work than per-tensor digests, the anchor);
- ``shardkit validate DIR --checksums FILE`` writing the manifest (header checks + one digest per tensor);
- the same comparing against that manifest.

Prints the median of ``--repeat`` rounds, MB/s and the ratio to sha256sum (above 1.00x: faster than sha256sum).

    python scripts/bench_checksums.py            # 48 x 4 MiB in 64 MB shards (~200 MB), for development
    python scripts/bench_checksums.py --full     # 64 x 32 MiB in 500 MB shards (~2.1 GB)
    python scripts/bench_checksums.py --checkpoint DIR   # an existing checkpoint folder instead (e.g. MiniLM's)

Target (issue 12): at least as fast as sha256sum over the same files.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shardkit.formats.safetensors import build_header  # noqa: E402
from shardkit.units import parse_size  # noqa: E402


def make_checkpoint(folder: Path, tensors: int, tensor_size: int, shard_size: int) -> list[Path]:
    """Shards ``model-0000i-of-0000n.safetensors`` of random bytes and their index (the layout validate expects)."""
    per_shard = max(1, shard_size // tensor_size)
    count = -(-tensors // per_shard)
    paths, weight_map = [], {}
    block = os.urandom(1 << 20)
    for shard in range(count):
        names = [f"layers.{i:04d}.weight" for i in range(shard * per_shard, min(tensors, (shard + 1) * per_shard))]
        name = f"model-{shard + 1:05d}-of-{count:05d}.safetensors"
        header = build_header([(n, "F32", (tensor_size // 4,), tensor_size) for n in names], {"format": "pt"})
        with open(folder / name, "wb") as handle:
            handle.write(header)
            for _ in names:
                left = tensor_size
                while left:
                    n = min(left, len(block))
                    handle.write(block[:n])
                    left -= n
                    block = block[7:] + block[:7]  # never the same MiB twice
        weight_map.update(dict.fromkeys(names, name))
        paths.append(folder / name)
    import json

    index = {"metadata": {"total_size": tensors * tensor_size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return paths


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=48)
    parser.add_argument("--tensor-size", default="4MiB")
    parser.add_argument("--shard-size", default="64MB")
    parser.add_argument("--full", action="store_true", help="64 tensors of 32 MiB in 500 MB shards")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp folder)")
    parser.add_argument("--checkpoint", default=None, help="time this checkpoint folder (*.safetensors) instead")
    args = parser.parse_args()
    if args.full:
        args.tensors, args.tensor_size, args.shard_size = 64, "32MiB", "500MB"
    if shutil.which("sha256sum") is None:
        sys.exit("sha256sum is not installed")
    tensor_size = parse_size(args.tensor_size)

    folder = Path(tempfile.mkdtemp(prefix="bench-checksums-", dir=args.dir))
    try:
        if args.checkpoint:
            paths = sorted(Path(args.checkpoint).glob("*.safetensors"))
            folder.rmdir()
            folder = Path(args.checkpoint)
        else:
            paths = make_checkpoint(folder, args.tensors, tensor_size, parse_size(args.shard_size))
        total = sum(p.stat().st_size for p in paths)
        manifest = Path(tempfile.gettempdir()) / f"bench-checksums-{os.getpid()}.json"
        shardkit = [sys.executable, "-m", "shardkit", "validate", str(folder), "--checksums", str(manifest), "-q"]
        cases = {
            "sha256sum (per file)": ["sha256sum", *map(str, paths)],
            "shardkit write manifest": shardkit,
            "shardkit compare manifest": shardkit,
        }
        timed(cases["sha256sum (per file)"])  # warm the page cache
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.repeat):
            for name, command in cases.items():
                if name == "shardkit write manifest" and manifest.exists():
                    manifest.unlink()
                times[name].append(timed(command))
        base = statistics.median(times["sha256sum (per file)"])
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        print(
            f"{folder if args.checkpoint else 'random checkpoint'}: {len(paths)} files, {total / 1e6:.0f} MB, "
            f"warm page cache, {cores} cores, whole processes, median of {args.repeat}"
        )
        for name, values in times.items():
            median = statistics.median(values)
            print(f"  {name:<26} {median:7.3f} s  {total / median / 1e6:7.0f} MB/s  {base / median:5.2f}x sha256sum")
        manifest.unlink(missing_ok=True)
    finally:
        if not args.checkpoint:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
