"""How fast `shardkit inspect` answers on a large checkpoint, against the usual way of listing one.

Builds a Llama-70B-shaped checkpoint (80 layers, 723 tensors, ~140 GB of bf16) as sparse files — real headers,
holes for data, so it costs no disk — once as 30 safetensors shards and once as a 4-shard torch zip of a smaller
model, then times whole processes, start-up included:

- `shardkit inspect` (headers only, no torch import);
- the anchor for safetensors: a script opening every shard with `safetensors.safe_open(framework="pt")` and
  reading each tensor's shape and dtype (what users write);
- the anchor for .bin: `torch.load(mmap=True, weights_only=True)` per shard (the cheapest torch way).

    python scripts/bench_inspect.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shardkit.formats.safetensors import build_header  # noqa: E402
from shardkit.naming import index_file_name, shard_file_name  # noqa: E402


def llama70b_shapes() -> list[tuple[str, tuple[int, ...]]]:
    hidden, inter, vocab, kv = 8192, 28672, 128256, 1024
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(80):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def sparse_safetensors(folder: Path, shards: int = 30) -> int:
    shapes = llama70b_shapes()
    per = -(-len(shapes) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        group = shapes[i * per : (i + 1) * per]
        name = shard_file_name(i + 1, shards)
        sizes = [(n, "BF16", s, 2 * _numel(s)) for n, s in group]
        header = build_header(sizes, {"format": "pt"})
        data = sum(size for *_, size in sizes)
        with open(folder / name, "wb") as handle:
            handle.write(header)
            handle.truncate(len(header) + data)
        weight_map.update({n: name for n, _ in group})
        total += data
    (folder / index_file_name()).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def time_command(command: list[str], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
        best = min(best, time.perf_counter() - start)
    return best


ANCHOR_SAFETENSORS = """
import json, sys
from pathlib import Path
from safetensors import safe_open
folder = Path(sys.argv[1])
files = sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))
count = 0
for name in files:
    with safe_open(str(folder / name), framework="pt") as f:
        for key in f.keys():
            s = f.get_slice(key)
            s.get_shape(), s.get_dtype()
            count += 1
print(count)
"""

ANCHOR_BIN = """
import sys, torch
count = 0
for path in sys.argv[1:]:
    state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    count += sum(1 for v in state.values() if isinstance(v, torch.Tensor))
print(count)
"""


def bin_shards(folder: Path) -> list[Path]:
    """A 7B-shaped state dict written by torch.save into 4 shards (real bytes; zeros compress nothing in a zip)."""
    import torch

    paths, weight_map = [], {}
    for i in range(4):
        state = {
            f"model.layers.{i * 8 + j}.{k}": torch.zeros(s, dtype=torch.bfloat16)
            for j in range(8)
            for k, s in (("q.weight", (1024, 1024)), ("mlp.weight", (2048, 1024)))
        }
        path = folder / shard_file_name(i + 1, 4, "bin")
        torch.save(state, path)
        paths.append(path)
        weight_map.update({name: path.name for name in state})
    index = {"metadata": {"total_size": 4 * 8 * 3 * 2**21}, "weight_map": weight_map}
    (folder / index_file_name("bin")).write_text(json.dumps(index))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-inspect-"))
    work.mkdir(parents=True, exist_ok=True)
    st = work / "llama70b"
    st.mkdir(exist_ok=True)
    total = sparse_safetensors(st)
    shardkit = [sys.executable, "-m", "shardkit", "inspect", str(st)]
    anchor = [sys.executable, "-c", ANCHOR_SAFETENSORS, str(st)]
    rows = [
        (
            "safetensors, 30 shards, %.0f GB (sparse)" % (total / 1e9),
            time_command(shardkit),
            time_command(anchor),
            "safe_open per shard",
        )
    ]

    binary = work / "bin"
    binary.mkdir(exist_ok=True)
    paths = bin_shards(binary)
    rows.append(
        (
            "torch zip .bin, 4 shards, 0.20 GB",
            time_command([sys.executable, "-m", "shardkit", "inspect", str(binary)]),
            time_command([sys.executable, "-c", ANCHOR_BIN, *map(str, paths)]),
            "torch.load(mmap=True) per shard",
        )
    )
    help_time = time_command([sys.executable, "-m", "shardkit", "--help"])
    print(f"{'checkpoint':<40} {'shardkit s':>10} {'anchor s':>10} {'speed-up':>9}  anchor")
    for label, ours, theirs, what in rows:
        print(f"{label:<40} {ours:>10.3f} {theirs:>10.3f} {theirs / ours:>8.1f}x  {what}")
    print(f"shardkit --help: {help_time:.3f} s")


if __name__ == "__main__":
    main()
