#!/usr/bin/env python
"""Benchmark ``shardkit split``/``convert`` against ``cp`` and huggingface_hub in one run.

Generates a Llama-shaped bf16 checkpoint with tied embeddings (default ~1.36 GB: hidden 2048, intermediate 5632,
12 layers, vocab 32000) as ``pytorch_model.bin`` and ``model.safetensors``, then times whole processes (start-up
included), each in its own child, each after the same page-cache warm-up (the source read once) and each
followed by ``sync`` inside the timing so every tool pays for getting its bytes to disk (shardkit fsyncs anyway).
Peak RSS is the child's own (``/usr/bin/time -f %M`` when present, else ``wait4``'s ru_maxrss).

    python scripts/bench_split.py [--layers 12] [--repeat 3] [--dir .bench]

Prints, per command, the median wall time, its ratio to ``cp`` and the peak RSS with its ratio to
huggingface_hub's. Targets (issue 3): shardkit within 1.3x of cp, peak RSS under 10% of huggingface_hub's.
Transforms (issue 15): ``split --rename`` against a plain split of the same source (target: at most 1.1x), and
``split --dequantize bf16`` of a block-FP8 copy of the checkpoint (``F8_E4M3`` weights with 128x128
``weight_scale_inv``) against a whole-model torch script doing the same (GB/s of output and peak RSS).
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

GENERATE = """
import sys, torch
from safetensors.torch import save_file
hidden, inter, layers, vocab, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
g = torch.Generator().manual_seed(0)
def w(*shape):
    return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
state = {"model.embed_tokens.weight": w(vocab, hidden)}
for i in range(layers):
    p = f"model.layers.{i}."
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        state[p + f"self_attn.{name}.weight"] = w(hidden, hidden)
    state[p + "mlp.gate_proj.weight"] = w(inter, hidden)
    state[p + "mlp.up_proj.weight"] = w(inter, hidden)
    state[p + "mlp.down_proj.weight"] = w(hidden, inter)
    state[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    state[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
state["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied
torch.save(state, out + "/pytorch_model.bin")
del state["lm_head.weight"]
save_file(state, out + "/model.safetensors", metadata={"format": "pt", "lm_head.weight": "model.embed_tokens.weight"})
"""

#: The block-FP8 twin of the checkpoint: every 2-D bf16 weight quantized per 128x128 tile (DeepSeek-V3's layout).
GENERATE_FP8 = """
import sys, torch
from safetensors.torch import load_file, save_file
state = load_file(sys.argv[1])
out = {}
for name, w in state.items():
    if w.dim() != 2 or "embed" in name:
        out[name] = w
        continue
    rows, cols = w.shape
    s = torch.ones((rows + 127) // 128, (cols + 127) // 128) * (w.float().abs().amax() / 448)
    out[name] = (w.float() / s.max()).to(torch.float8_e4m3fn)
    out[name + "_scale_inv"] = s
save_file(out, sys.argv[2], metadata={"format": "pt"})
"""

#: What hand-written scripts do: load everything, dequantize everything in float32, save everything.
TORCH_DEQUANTIZE = """
import sys, torch
from safetensors.torch import load_file, save_file
state = load_file(sys.argv[1])
out = {}
for name, w in state.items():
    if name.endswith("_scale_inv"):
        continue
    s = state.get(name + "_scale_inv")
    if s is None:
        out[name] = w
        continue
    rows, cols = w.shape
    e = s.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    out[name] = (w.float() * e).to(torch.bfloat16)
save_file(out, sys.argv[2] + "/model.safetensors", metadata={"format": "pt"})
"""

PLAIN_ST = "shardkit split (.safetensors -> shards)"
RENAMED = "shardkit split --rename (.safetensors -> shards)"
TORCH_FP8 = "torch load_file + dequantize all + save_file"
SHARDKIT_FP8 = "shardkit split --dequantize bf16"

HUB = """
import sys, torch
from huggingface_hub import save_torch_state_dict
state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
save_torch_state_dict(state, sys.argv[2], max_shard_size=sys.argv[3])
"""


def warm(path: Path) -> None:
    """Read ``path`` once so every command starts from the same (cached) source."""
    with open(path, "rb", buffering=0) as handle:
        while handle.read(16 * 1024 * 1024):
            pass


def timed(command: list[str], env: dict) -> tuple[float, int]:
    """Wall seconds of ``command`` plus a ``sync``, and the command's peak RSS in bytes."""
    use_time = shutil.which("time") or (Path("/usr/bin/time").exists() and "/usr/bin/time")
    with tempfile.NamedTemporaryFile("r") as report:
        full = [use_time, "-f", "%M", "-o", report.name, *command] if use_time else command
        start = time.perf_counter()
        process = subprocess.Popen(full, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(process.pid, 0)
        os.sync()
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"failed: {' '.join(command)}\n{process.stderr.read().decode()}")
        process.stderr.close()
        rss = int(report.read().strip().splitlines()[-1]) * 1024 if use_time else usage.ru_maxrss * 1024
    return seconds, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--max-shard-size", default="500MB", help="for hub and shardkit split")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=str(ROOT / ".bench"))
    args = parser.parse_args()

    work = Path(args.dir)
    source = work / "source"
    source.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    if not (source / "pytorch_model.bin").exists() or not (source / "model.safetensors").exists():
        print("generating the checkpoint...", file=sys.stderr)
        subprocess.run(
            [
                sys.executable,
                "-c",
                GENERATE,
                str(args.hidden),
                str(args.intermediate),
                str(args.layers),
                str(args.vocab),
                str(source),
            ],
            check=True,
            env=env,
        )
    src_bin, src_st = source / "pytorch_model.bin", source / "model.safetensors"
    size = src_bin.stat().st_size
    shardkit = [sys.executable, "-m", "shardkit"]
    commands = {
        "cp": (src_bin, lambda out: ["cp", str(src_bin), str(out / "pytorch_model.bin")]),
        "huggingface_hub torch.load + save_torch_state_dict": (
            src_bin,
            lambda out: [sys.executable, "-c", HUB, str(src_bin), str(out), args.max_shard_size],
        ),
        "shardkit split (.bin -> safetensors shards)": (
            src_bin,
            lambda out: [
                *shardkit,
                "split",
                str(src_bin),
                str(out),
                "--max-shard-size",
                args.max_shard_size,
                "--quiet",
                "--overwrite",
            ],
        ),
        "shardkit convert (.bin -> safetensors)": (
            src_bin,
            lambda out: [*shardkit, "convert", str(src_bin), str(out), "--quiet", "--overwrite"],
        ),
        PLAIN_ST: (
            src_st,
            lambda out: [
                *shardkit,
                "split",
                str(src_st),
                str(out),
                "--max-shard-size",
                args.max_shard_size,
                "--quiet",
                "--overwrite",
            ],
        ),
    }
    src_fp8 = work / "fp8" / "model.safetensors"
    if not src_fp8.exists():
        print("generating the block-FP8 checkpoint...", file=sys.stderr)
        src_fp8.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-c", GENERATE_FP8, str(src_st), str(src_fp8)], check=True, env=env)
    commands.update(
        {
            RENAMED: (
                src_st,
                lambda out: [
                    *shardkit,
                    "split",
                    str(src_st),
                    str(out),
                    "--max-shard-size",
                    args.max_shard_size,
                    "--rename",
                    r"^model\.layers\.(\d+)\.=model.h.\1.",
                    "--quiet",
                    "--overwrite",
                ],
            ),
            TORCH_FP8: (src_fp8, lambda out: [sys.executable, "-c", TORCH_DEQUANTIZE, str(src_fp8), str(out)]),
            SHARDKIT_FP8: (
                src_fp8,
                lambda out: [*shardkit, "split", str(src_fp8), str(out), "--dequantize", "bf16", "--quiet", "--overwrite"],
            ),
        }
    )
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
    for _ in range(args.repeat):
        for name, (src, build) in commands.items():  # interleaved, so drifts in disk speed hit every command alike
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            os.sync()
            warm(src)
            results[name].append(timed(build(out), env))
    shutil.rmtree(work / "out", ignore_errors=True)

    cp_time = statistics.median(t for t, _ in results["cp"])
    hub_rss = max(r for _, r in results["huggingface_hub torch.load + save_torch_state_dict"])
    print(
        f"checkpoint: {size / 1e9:.2f} GB bf16 .bin ({args.layers} layers, tied embeddings); median of "
        f"{args.repeat} runs, each + sync"
    )
    print(f"{'command':<52} {'wall s':>7} {'vs cp':>6} {'peak RSS':>9} {'vs hub':>7}")
    for name, runs in results.items():
        seconds = statistics.median(t for t, _ in runs)
        rss = max(r for _, r in runs)
        print(f"{name:<52} {seconds:>7.2f} {seconds / cp_time:>5.2f}x {rss / 2**20:>6.0f} MiB {rss / hub_rss:>6.1%}")

    plain, renamed = (statistics.median(t for t, _ in results[n]) for n in (PLAIN_ST, RENAMED))
    print(f"\n--rename vs plain split of the same source: {renamed / plain:.2f}x (target: at most 1.10x)")
    out_bytes = sum(p.stat().st_size for p in src_st.parent.glob("model.safetensors"))
    print(f"--dequantize bf16 of a {src_fp8.stat().st_size / 1e9:.2f} GB block-FP8 checkpoint ({out_bytes / 1e9:.2f} GB out):")
    torch_t, torch_rss = statistics.median(t for t, _ in results[TORCH_FP8]), max(r for _, r in results[TORCH_FP8])
    for name in (TORCH_FP8, SHARDKIT_FP8):
        seconds, rss = statistics.median(t for t, _ in results[name]), max(r for _, r in results[name])
        print(
            f"  {name:<50} {out_bytes / seconds / 1e9:>5.2f} GB/s ({seconds / torch_t:.2f}x the time), "
            f"peak RSS {rss / 2**20:>6.0f} MiB ({rss / torch_rss:.1%} of torch's)"
        )


if __name__ == "__main__":
    main()
