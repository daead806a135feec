#!/usr/bin/env python
"""Benchmark ``shardkit split`` of DCP training checkpoints against ``cp`` and torch's own route, in one run.

Makes the folders the way FSDP2 saves them: 4 ranks on gloo (CPU), every tensor a DTensor on a 1-D mesh, saved
with ``torch.distributed.checkpoint.save``:

- ``fsdp``: a Llama-shaped bf16 model (``Shard(0)``) plus fp32 Adam state (``exp_avg``, ``exp_avg_sq``, ``step``)
  under ``{"model": ..., "optim": ...}``, as FSDP2 + ``get_state_dict`` saves it;
- ``tp``: the same model weights alone, every matrix ``Shard(1)`` (tensor-parallel style), vectors ``Shard(0)``.

Then times whole processes (start-up included), each after the same page-cache warm-up of its source and each
followed by ``sync``; peak RSS is the child's own (see ``bench_split.timed``):

- ``cp`` + ``sync`` of a file as large as the model weights (the floor for writing them);
- torch's route: ``dcp_to_torch_save`` + ``torch.load`` + huggingface_hub ``save_torch_state_dict`` of the model
  weights (what people run today; it holds the whole state dict, optimizer included);
- ``shardkit split`` of each folder, with torch blocked from import (the run fails if anything imports it).

    python scripts/bench_dcp.py            # small, for development (~40 MB of weights)
    python scripts/bench_dcp.py --full     # the issue's size: 1.35 GB bf16 weights, 6.3 GB folder (~6.5 GiB peak
                                           # for torch's route)

Targets (issue 14): the Shard(0) split at most 1.3x cp and 64 MiB peak RSS, no torch; the Shard(1) split at most
2x cp, memory at most one tensor plus the buffer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_split import timed, warm  # noqa: E402  (one timing harness for every benchmark)

WORLD = 4

TORCH_ROUTE = """
import sys, torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from huggingface_hub import save_torch_state_dict
folder, scratch, out = sys.argv[1:4]
dcp_to_torch_save(folder, scratch)
state = torch.load(scratch, map_location="cpu", weights_only=False)
save_torch_state_dict(state["model"], out, max_shard_size="5GB")
"""

#: shardkit's CLI with torch made unimportable: proves the byte path never imports it.
SHARDKIT_NO_TORCH = (
    "import sys; sys.modules['torch'] = None\nfrom shardkit.cli import main\nmain(sys.argv[1:], prog_name='shardkit')\n"
)


def shapes(hidden: int, inter: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """A Llama-shaped model's parameters (untied head)."""
    result = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            result[p + f"self_attn.{name}.weight"] = (hidden, hidden)
        result[p + "mlp.gate_proj.weight"] = (inter, hidden)
        result[p + "mlp.up_proj.weight"] = (inter, hidden)
        result[p + "mlp.down_proj.weight"] = (hidden, inter)
        result[p + "input_layernorm.weight"] = (hidden,)
        result[p + "post_attention_layernorm.weight"] = (hidden,)
    result["model.norm.weight"] = (hidden,)
    result["lm_head.weight"] = (vocab, hidden)
    return result


def _local(shape, dim: int, dtype, generator, *, touch: bool):
    """This rank's block of a tensor sharded evenly on ``dim`` (random values, or untouched memory when not ``touch``)."""
    import torch

    local = list(shape)
    local[dim] = shape[dim] // WORLD
    if not touch:
        return torch.empty(local, dtype=dtype)  # never written: reads as zeros without taking memory
    return torch.randn(local, generator=generator).to(dtype)


def _worker(rank: int, port: int, folder: str, sizes: dict) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(rank)

    def dtensor(shape, dim, dtype, touch=True):
        local = _local(shape, dim, dtype, g, touch=touch)
        stride = [1] * len(shape)
        for d in range(len(shape) - 2, -1, -1):
            stride[d] = stride[d + 1] * shape[d + 1]
        return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape), stride=tuple(stride))

    try:
        model = {name: dtensor(shape, 0, torch.bfloat16) for name, shape in sizes.items()}
        state = {
            name: {
                "step": torch.tensor(100.0),
                "exp_avg": dtensor(shape, 0, torch.float32, touch=False),
                "exp_avg_sq": dtensor(shape, 0, torch.float32, touch=False),
            }
            for name, shape in sizes.items()
        }
        optim = {"state": state, "param_groups": [{"lr": 3e-4, "betas": (0.9, 0.95), "params": list(sizes)}]}
        dcp.save({"model": model, "optim": optim}, checkpoint_id=os.path.join(folder, "fsdp"))
        del model, state, optim
        tp = {name: dtensor(shape, 1 if len(shape) == 2 else 0, torch.bfloat16) for name, shape in sizes.items()}
        dcp.save(tp, checkpoint_id=os.path.join(folder, "tp"))
    finally:
        dist.destroy_process_group()


def generate(folder: Path, sizes: dict) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_worker, args=(port, str(folder), sizes), nprocs=WORLD)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def warm_folder(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            warm(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the issue's size: hidden 2048, 12 layers, vocab 32000")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-torch", action="store_true", help="leave out torch's route (it holds the whole folder)")
    parser.add_argument("--generate-only", action="store_true", help="make the folders and stop")
    parser.add_argument("--dir", default=str(ROOT / ".bench-dcp"))
    args = parser.parse_args()
    if args.full:
        args.hidden, args.intermediate, args.layers, args.vocab = 2048, 5632, 12, 32000
    sizes = shapes(args.hidden, args.intermediate, args.layers, args.vocab)

    work = Path(args.dir) / f"h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}"
    if not (work / "tp" / ".metadata").exists():
        print("generating the DCP folders (4 gloo ranks)...", file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        generate(work, sizes)
    weights = sum(2 * _numel(shape) for shape in sizes.values())
    blob = work / "weights.bin"  # cp's source: a file as large as the model weights
    if not blob.exists() or blob.stat().st_size != weights:
        with open(blob, "wb") as handle:
            for start in range(0, weights, 64 << 20):
                handle.write(os.urandom(min(64 << 20, weights - start)))
    if args.generate_only:
        return

    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    out, scratch = work / "out", work / "scratch.pt"
    shardkit = [sys.executable, "-c", SHARDKIT_NO_TORCH]
    commands = {
        "cp + sync (model weights' bytes)": (blob, lambda: ["cp", str(blob), str(out / "weights.bin")]),
        "shardkit split, Shard(0) + Adam folder": (
            work / "fsdp",
            lambda: [*shardkit, "split", str(work / "fsdp"), str(out), "--quiet", "--overwrite"],
        ),
        "shardkit split, Shard(1) folder": (
            work / "tp",
            lambda: [*shardkit, "split", str(work / "tp"), str(out), "--quiet", "--overwrite"],
        ),
    }
    if not args.skip_torch:
        commands["dcp_to_torch_save + torch.load + save_torch_state_dict"] = (
            work / "fsdp",
            lambda: [sys.executable, "-c", TORCH_ROUTE, str(work / "fsdp"), str(scratch), str(out)],
        )
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
    for _ in range(args.repeat):
        for name, (source, build) in commands.items():  # interleaved: drifts in disk speed hit every command alike
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            scratch.unlink(missing_ok=True)
            os.sync()
            if source.is_dir():
                warm_folder(source)
            else:
                warm(source)
            results[name].append(timed(build(), env))
    shutil.rmtree(out, ignore_errors=True)
    scratch.unlink(missing_ok=True)

    cp_time = statistics.median(t for t, _ in results["cp + sync (model weights' bytes)"])
    largest = max(2 * _numel(shape) for shape in sizes.values())
    print(
        f"model: {weights / 1e9:.2f} GB bf16 weights ({args.layers} layers, hidden {args.hidden}, vocab {args.vocab}); "
        f"Shard(0) + Adam folder {folder_bytes(work / 'fsdp') / 1e9:.2f} GB in {WORLD} ranks; largest tensor "
        f"{largest / 2**20:.0f} MiB; median of {args.repeat} runs, each + sync"
    )
    print(f"{'command':<56} {'wall s':>7} {'vs cp':>6} {'peak RSS':>10}")
    for name, runs in results.items():
        seconds = statistics.median(t for t, _ in runs)
        rss = max(r for _, r in runs)
        print(f"{name:<56} {seconds:>7.2f} {seconds / cp_time:>5.2f}x {rss / 2**20:>6.0f} MiB")


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


if __name__ == "__main__":
    main()
