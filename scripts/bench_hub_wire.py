#!/usr/bin/env python
"""Bytes over the wire for ``shardkit validate org/name``, against servers that honour or ignore HTTP ``Range``.

Serves, from the loopback Hub of ``tests/hubserver.py``, a ``.bin`` repo of many records (GPT-2-shaped: one
record per tensor) and a sharded safetensors repo whose multi-GB shards are made up lazily. For each server
behaviour it runs ``shardkit.validate`` and prints the bytes the reader received, the bytes the server sent
(more than received when a connection is cut off: what was in flight), the requests, and their ratio to the
anchor: the file sizes, i.e. what ``hf_hub_download`` of the same files sends (measured in the same run for the
``.bin`` repo).

    python scripts/bench_hub_wire.py           # a 5 MB .bin, 3 x 1 GB shards, for development
    python scripts/bench_hub_wire.py --full    # the issue's 18.9 MB .bin, 8 x 5 GB shards

Target (issue 18): with Range, headers only for safetensors (kilobytes per shard); without Range, at most about
one file's size per file (before: 74 MB read and 130 MB sent for an 18.9 MB .bin). A ``.bin`` of many records
switches from ranges to one streamed request after 8 ranges when at most 32 MiB remain (round trips, not bytes,
dominate on a real network). Measured on the 2-core development machine, loopback:

    --full: .bin 18.9 MB   anchor hf_hub_download  sent 18,930,723 (1.0000)   3 requests
            honours Range  sent 18,445,590 (0.9744)   22 requests (390 before the switch, 3.3 MB)
            ignores Range  sent 18,930,723 (1.0000)    4 requests (before: 130 MB sent)
            8 x 5 GB safetensors, honours Range 801,689 B; ignores Range 1,050,265 B received,
            ~30 MB sent (what was in flight when each connection was cut off: 0.0008 of the files)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def _isolate(endpoint: str, home: Path) -> None:
    import huggingface_hub.constants as constants

    os.environ.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(home),
        HF_HUB_CACHE=str(home / "hub"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    os.environ.pop("HF_TOKEN", None)
    constants.HF_HUB_CACHE = str(home / "hub")
    constants.HF_TOKEN_PATH = str(home / "token")
    constants.HF_STORED_TOKENS_PATH = str(home / "stored_tokens")


def _bin_repo(folder: Path, size: int) -> Path:
    import torch

    folder.mkdir(parents=True)
    per = 24_576  # 96 kB records, like GPT-2's smaller tensors
    state = {f"h.{i}.weight": torch.randn(per) for i in range(max(1, size // (per * 4)))}
    path = folder / "pytorch_model.bin"
    torch.save(state, path)
    return path


def _shard_repo(server, repo_id: str, shards: int, shard_bytes: int) -> None:
    from hubserver import Repo, VirtualFile

    from shardkit.formats.safetensors import build_header

    files, weight_map = {}, {}
    per = shard_bytes // 4
    for i in range(1, shards + 1):
        name = f"model-{i:05d}-of-{shards:05d}.safetensors"
        tensors = [(f"layers.{i}.w{j}", "U8", (per,), per) for j in range(4)]
        header = build_header(tensors, {"format": "pt"})
        files[name] = VirtualFile(header, len(header) + per * 4)
        weight_map.update({t[0]: name for t in tensors})
    index = json.dumps({"metadata": {"total_size": per * 4 * shards}, "weight_map": weight_map}).encode()
    files["model.safetensors.index.json"] = VirtualFile(index, len(index))
    server.repos[repo_id] = Repo(files=files)


def _run(server, what, honour: bool) -> dict:
    server.honour_range, server.sent, server.requests[:] = honour, 0, []
    started = time.perf_counter()
    result = what()
    return {"seconds": time.perf_counter() - started, "sent": server.sent, "requests": len(server.requests), **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the issue's sizes: an 18.9 MB .bin, 8 x 5 GB shards")
    args = parser.parse_args()
    bin_size, shards, shard_bytes = (18_900_000, 8, 5 * 10**9) if args.full else (5_000_000, 3, 10**9)

    from hubserver import HubServer

    import shardkit

    server = HubServer()
    endpoint = server.start()
    with tempfile.TemporaryDirectory(prefix="shardkit-bench-hub-") as tmp:
        work = Path(tmp)
        _isolate(endpoint, work / "hf_home")
        path = _bin_repo(work / "binrepo", bin_size)
        size = path.stat().st_size
        server.add_folder("org/bin", work / "binrepo")
        _shard_repo(server, "org/shards", shards, shard_bytes)

        def validate(repo_id):
            def run():
                report = shardkit.validate(repo_id)
                assert report.ok, report.to_dict()
                return {"received": report.bytes_downloaded, "ignored": report.server_ignored_range}

            return run

        def download():
            from huggingface_hub import hf_hub_download

            hf_hub_download("org/bin", "pytorch_model.bin", endpoint=endpoint, cache_dir=str(work / "anchor"))
            return {"received": size, "ignored": False}

        rows = [
            (f"anchor: hf_hub_download of the .bin ({size / 1e6:.1f} MB)", _run(server, download, True), size),
            ("validate .bin repo, server honours Range", _run(server, validate("org/bin"), True), size),
            ("validate .bin repo, server ignores Range", _run(server, validate("org/bin"), False), size),
        ]
        total = shards * shard_bytes
        label = f"{shards} x {shard_bytes / 1e9:.0f} GB shards"
        rows += [
            (f"validate {label}, server honours Range", _run(server, validate("org/shards"), True), total),
            (f"validate {label}, server ignores Range", _run(server, validate("org/shards"), False), total),
        ]
    server.stop()
    print(f"{'case':<58} {'received':>12} {'server sent':>12} {'requests':>8} {'sent/size':>10} {'seconds':>8}")
    for name, row, files in rows:
        print(
            f"{name:<58} {row['received']:>12,} {row['sent']:>12,} {row['requests']:>8} "
            f"{row['sent'] / files:>10.4f} {row['seconds']:>8.2f}"
        )


if __name__ == "__main__":
    main()
