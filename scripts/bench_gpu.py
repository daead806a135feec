"""GPU benchmark: loading and offloaded inference, shardkit against accelerate and diffusers, in one run.

Builds a seeded Llama-shaped bf16 checkpoint (hidden 4096, intermediate 11008, 16 layers, vocab 32000: 7.0 GB in
5 safetensors shards, a quarter of it at most each) on the GPU, measures the hardware limits (pinned and
pageable host->GPU copies, direct and page-cache disk reads), then runs each library's case in its own
subprocess (so peak host RSS is its own) and
prints one table: seconds, effective GB/s, and ratios to accelerate and to the hardware limit.

    python scripts/bench_gpu.py [--workdir DIR] [--layers 16] [--out results.json]

Needs a CUDA GPU, transformers and accelerate; diffusers is optional (its rows are skipped without it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, VOCAB, HEADS = 4096, 11008, 32000, 32
GPU_CAP = 2 * 2**30  # "GPU capped at 2 GiB": the weights that may stay resident
SHAPES = {"1tok": (1, 1), "128tok": (1, 128), "4x4096": (4, 4096)}
ROOT = Path(__file__).resolve().parents[1]


# --- helpers shared by the workers ------------------------------------------------------------------------------


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        attn_implementation="sdpa",
    )


def empty_model(lib, layers: int):
    import torch
    from transformers import LlamaForCausalLM

    torch.set_default_dtype(torch.bfloat16)
    with lib.init_empty_weights():
        model = LlamaForCausalLM(llama_config(layers))
    torch.set_default_dtype(torch.float32)
    return model.eval()


def inputs(shape, device="cuda"):
    import torch

    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, shape, generator=g).to(device)


def drop_page_cache(folder: Path) -> None:
    """Evict the checkpoint's files from the page cache (fadvise needs no root; drop_caches where allowed)."""
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    try:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def warm_page_cache(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            while handle.read(64 << 20):
                pass


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed_forward(model, shape, repeats: int = 3, before_each=None):
    import torch

    ids = inputs(shape)
    with torch.inference_mode():
        out = model(ids).logits  # warm-up (and the first, prefetch-learning pass)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            del out
            if before_each is not None:
                before_each()
            start = time.perf_counter()
            out = model(ids).logits
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], out


def output_digest(out) -> str:
    """SHA-256 of the output's bytes, streamed to the host 64 MiB at a time (so it adds nothing to peak RSS)."""
    import hashlib

    import torch

    flat = out.contiguous().view(-1).view(torch.uint8)
    digest = hashlib.sha256()
    for start in range(0, flat.numel(), 64 << 20):
        digest.update(flat[start : start + (64 << 20)].cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def gpu_overhead(total_bytes: int, offloaded: int) -> int:
    """GPU bytes at peak beyond the weights kept resident there: staging buffers plus activations."""
    import torch

    return torch.cuda.max_memory_allocated() - (total_bytes - offloaded)


# --- workers ----------------------------------------------------------------------------------------------------


def worker_generate(args) -> dict:
    """Seeded weights made on the GPU, saved in shards of a quarter of the bytes at most (5 files)."""
    import torch
    from huggingface_hub import save_torch_state_dict
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(llama_config(args.layers))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    total = sum(v.numel() * v.element_size() for v in state.values())
    folder = Path(args.checkpoint)
    folder.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(state, str(folder), max_shard_size=total // 4 + 2**20)
    llama_config(args.layers).save_pretrained(folder)
    os.sync()
    return {"bytes": total, "files": sorted(p.name for p in folder.iterdir())}


def worker_hardware(args) -> dict:
    """Pinned and pageable host->GPU bandwidth; direct (O_DIRECT, cold) and page-cache disk reads."""
    import mmap

    import torch

    size = 1 << 30
    gpu = torch.empty(size, dtype=torch.uint8, device="cuda")
    result = {}
    for name, pin in (("h2d_pinned", True), ("h2d_pageable", False)):
        host = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        host.fill_(1)
        gpu.copy_(host, non_blocking=pin)
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(20):  # the best of many: the first copies after idle run below the link's rate
            start = time.perf_counter()
            gpu.copy_(host, non_blocking=pin)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        result[name] = size / best / 1e9
        del host

    folder = Path(args.checkpoint)
    files = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")
    total = sum(p.stat().st_size for p in files)
    chunk = 64 << 20

    def read_all(direct: bool, threads: int = 1) -> float:
        """Whole files in 64 MiB reads; with threads, each thread reads every n-th chunk (page-aligned buffers)."""
        from concurrent.futures import ThreadPoolExecutor

        buffers = [mmap.mmap(-1, chunk) for _ in range(threads)]

        def reader(index: int) -> None:
            for path in files:
                fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
                try:
                    size = os.fstat(fd).st_size
                    for offset in range(index * chunk, size, threads * chunk):
                        os.preadv(fd, [buffers[index]], offset)
                finally:
                    os.close(fd)

        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(reader, range(threads)))
        return total / (time.perf_counter() - start) / 1e9

    # The limits are the best of 1 to 16 reader threads, more than any library here uses.
    direct = {}
    for threads in (1, 4, 8, 16):
        drop_page_cache(folder)
        direct[threads] = read_all(direct=True, threads=threads)
    result["disk_direct_1thread"], result["disk_direct"] = direct[1], max(direct.values())
    warm_page_cache(folder)
    result["disk_cached"] = max(read_all(direct=False, threads=threads) for threads in (1, 4, 8, 16))
    return result


def _lib(name: str):
    import importlib

    return importlib.import_module("shardkit" if name == "shardkit" else "accelerate")


def worker_load(args) -> dict:
    """Load the whole checkpoint onto the GPU, cold (page cache dropped) or warm."""
    import torch

    lib = _lib(args.lib)
    folder = Path(args.checkpoint)
    model = empty_model(lib, args.layers)
    if args.cold:
        drop_page_cache(folder)
    else:
        warm_page_cache(folder)
    torch.cuda.synchronize()
    start = time.perf_counter()
    lib.load_checkpoint_and_dispatch(model, str(folder), device_map={"": 0}, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    _, out = timed_forward(model, SHAPES["128tok"], repeats=1)
    return {"seconds": seconds, "peak_rss": peak_rss(), "digest": output_digest(out)}


def device_map_for(args, tier: str) -> dict:
    """One map for every library: accelerate's plan with the GPU capped, the rest on the CPU (or disk) tier."""
    import accelerate

    model = empty_model(accelerate, args.layers)
    device_map = accelerate.infer_auto_device_map(
        model, max_memory={0: GPU_CAP, "cpu": 512 * 2**30}, no_split_module_classes=["LlamaDecoderLayer"]
    )
    if tier == "disk":
        device_map = {k: ("disk" if v == "cpu" else v) for k, v in device_map.items()}
    if tier == "allcpu":  # every decoder layer and the head on the CPU tier; only the embedding lookup on the GPU
        device_map = {"model.embed_tokens": 0, "model.layers": "cpu", "model.norm": 0, "model.rotary_emb": 0, "lm_head": "cpu"}
    return device_map


def worker_offload(args) -> dict:
    """Forward passes with part of the weights on the CPU or disk tier."""
    import tempfile

    import torch

    folder = Path(args.checkpoint)
    device_map = device_map_for(args, args.tier)
    if args.lib == "diffusers":
        return _diffusers_offload(args, folder)
    lib = _lib(args.lib)
    model = empty_model(lib, args.layers)
    warm_page_cache(folder)
    offload = tempfile.mkdtemp(prefix="offload-", dir=args.workdir)
    start = time.perf_counter()
    lib.load_checkpoint_and_dispatch(
        model,
        str(folder),
        device_map=device_map,
        offload_folder=offload,
        dtype=torch.bfloat16,
        no_split_module_classes=["LlamaDecoderLayer"],
    )
    torch.cuda.synchronize()
    load_seconds = time.perf_counter() - start
    before_each = (lambda: drop_page_cache(folder)) if args.tier == "disk" and args.cold else None
    offloaded = offloaded_bytes(folder, device_map)
    result = {"load_seconds": load_seconds, "offloaded_bytes": offloaded, "shapes": {}}
    total = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    for key in args.shapes.split(","):
        seconds, out = timed_forward(model, SHAPES[key], repeats=1 if args.cold else 3, before_each=before_each)
        result["shapes"][key] = {"seconds": seconds, "digest": output_digest(out), "gpu_overhead": gpu_overhead(total, offloaded)}
        del out
    result["peak_rss"] = peak_rss()
    return result


def offloaded_bytes(folder: Path, device_map: dict) -> int:
    """Bytes of the checkpoint's tensors that ``device_map`` puts on the CPU or disk tier."""
    from shardkit import open_checkpoint
    from shardkit.bigmodel.devicemap import covering_key

    return sum(
        e.nbytes for e in open_checkpoint(folder).stored if device_map.get(covering_key(e.name, device_map)) in ("cpu", "disk")
    )


def _diffusers_offload(args, folder: Path) -> dict:
    """diffusers group offloading, leaf level with a side stream: every weight on the CPU tier, pinned."""
    import torch
    from diffusers.hooks import apply_group_offloading

    warm_page_cache(folder)
    start = time.perf_counter()
    model = materialized_model(folder, args.layers, "cpu")
    load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    apply_group_offloading(model, onload_device=torch.device("cuda"), offload_type="leaf_level", use_stream=True)
    pin_seconds = time.perf_counter() - start
    offloaded = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {"load_seconds": load_seconds, "pin_seconds": pin_seconds, "offloaded_bytes": offloaded, "shapes": {}}
    for key in args.shapes.split(","):
        seconds, out = timed_forward(model, SHAPES[key])
        result["shapes"][key] = {
            "seconds": seconds,
            "digest": output_digest(out),
            "gpu_overhead": gpu_overhead(offloaded, offloaded),
        }
        del out
    result["peak_rss"] = peak_rss()
    return result


def materialized_model(folder: Path, layers: int, device: str):
    """The model with its weights loaded the plain way (safetensors -> load_state_dict) onto ``device``."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(layers))
    torch.set_default_dtype(torch.float32)
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(path), device=device))
    model.load_state_dict(state, assign=True, strict=True)
    # Non-persistent buffers (rotary inv_freq) are not in the checkpoint: rebuild them for real.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config, device=device)
    return model.eval()


def worker_gpu_reference(args) -> dict:
    """Everything on the GPU: the time to beat for compute-bound shapes and the outputs to match bit for bit."""
    folder = Path(args.checkpoint)
    model = materialized_model(folder, args.layers, "cuda")
    result = {"shapes": {}}
    for key in args.shapes.split(","):
        seconds, out = timed_forward(model, SHAPES[key])
        result["shapes"][key] = {"seconds": seconds, "digest": output_digest(out)}
        del out
    return result


def worker_two_gpus(args) -> dict:
    """shardkit with a "balanced" map over two GPUs (2 GiB of weights each) plus the CPU tier."""
    import torch

    import shardkit

    folder = Path(args.checkpoint)
    model = empty_model(shardkit, args.layers)
    warm_page_cache(folder)
    max_memory = {0: GPU_CAP, 1: GPU_CAP, "cpu": 512 * 2**30}
    start = time.perf_counter()
    shardkit.load_checkpoint_and_dispatch(
        model,
        str(folder),
        device_map="balanced",
        max_memory=max_memory,
        dtype=torch.bfloat16,
        no_split_module_classes=["LlamaDecoderLayer"],
    )
    load_seconds = time.perf_counter() - start
    devices = sorted({str(d) for d in model.hf_device_map.values()})
    offloaded = offloaded_bytes(folder, model.hf_device_map)
    result = {"load_seconds": load_seconds, "devices": devices, "offloaded_bytes": offloaded, "shapes": {}}
    for key in args.shapes.split(","):
        seconds, out = timed_forward(model, SHAPES[key])
        result["shapes"][key] = {"seconds": seconds, "digest": output_digest(out)}
        del out
    result["peak_rss"] = peak_rss()
    return result


WORKERS = {
    "twogpu": worker_two_gpus,
    "generate": worker_generate,
    "hardware": worker_hardware,
    "load": worker_load,
    "offload": worker_offload,
    "gpu": worker_gpu_reference,
}


# --- orchestration -----------------------------------------------------------------------------------------------


def run_worker(args, name: str, **extra) -> dict | None:
    command = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--checkpoint",
        str(args.checkpoint),
        "--layers",
        str(args.layers),
        "--workdir",
        str(args.workdir),
        "--shapes",
        args.shapes,
    ]
    for key, value in extra.items():
        if value is True:
            command.append(f"--{key}")
        elif value not in (None, False):
            command += [f"--{key}", str(value)]
    label = " ".join([name] + [f"{k}={v}" for k, v in extra.items()])
    started = time.perf_counter()
    result, tail = run_result(command, args.case_timeout)
    if result is None:
        print(f"[{time.perf_counter() - started:6.1f}s] {label}: FAILED\n    " + "\n    ".join(tail[-6:]), flush=True)
        return None
    print(f"[{time.perf_counter() - started:6.1f}s] {label}: {json.dumps(result)[:300]}", flush=True)
    return result


def run_result(command: list[str], timeout: float) -> tuple[dict | None, list[str]]:
    """Run a worker process with this repository importable: its last ``RESULT {json}`` line, or None and the
    last lines of its output when it failed or printed none."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return None, (proc.stderr or proc.stdout).strip().splitlines()[-8:]
    return json.loads(lines[-1][len("RESULT ") :]), []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / ".bench"))
    parser.add_argument("--checkpoint")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--shapes", default="128tok,1tok,4x4096")
    parser.add_argument("--libs", default="accelerate,diffusers,shardkit")
    parser.add_argument("--cases", default="load,cpu,allcpu,disk,twogpu")
    parser.add_argument("--out", help="results JSON (default: WORKDIR/results-<layers>l.json), rewritten after each case")
    parser.add_argument("--resume", action="store_true", help="keep the cases already in --out and run only the others")
    parser.add_argument("--case-timeout", type=int, default=240)
    parser.add_argument("--worker")
    parser.add_argument("--lib")
    parser.add_argument("--tier")
    parser.add_argument("--cold", action="store_true")
    args = parser.parse_args()
    args.workdir = Path(args.workdir)
    args.checkpoint = Path(args.checkpoint or args.workdir / f"llama-{args.layers}l")

    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker](args)), flush=True)
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or args.workdir / f"results-{args.layers}l.json")
    results: dict = json.loads(out.read_text()) if args.resume and out.exists() else {}
    results["layers"] = args.layers

    def case(key: str, name: str, **extra) -> None:
        if results.get(key) is None:  # --resume skips what an earlier run of the same checkpoint measured
            results[key] = run_worker(args, name, **extra)
            out.write_text(json.dumps(results, indent=2))

    if not (args.checkpoint / "config.json").exists():
        case("checkpoint", "generate")
    results["bytes"] = sum(p.stat().st_size for p in args.checkpoint.glob("*.safetensors"))
    cases = args.cases.split(",")
    if set(cases) & {"load", "cpu", "allcpu", "disk"}:
        case("hardware", "hardware")
    case("gpu", "gpu")
    for lib in args.libs.split(","):
        if "load" in cases and lib != "diffusers":
            case(f"{lib}/load-cold", "load", lib=lib, cold=True)
            case(f"{lib}/load-warm", "load", lib=lib)
        if "cpu" in cases:
            case(f"{lib}/cpu", "offload", lib=lib, tier="cpu")
        if "allcpu" in cases and lib != "diffusers":
            case(f"{lib}/allcpu", "offload", lib=lib, tier="allcpu", shapes="128tok")
        if "disk" in cases and lib != "diffusers":
            case(f"{lib}/disk-warm", "offload", lib=lib, tier="disk")
            case(f"{lib}/disk-cold", "offload", lib=lib, tier="disk", cold=True, shapes="128tok")
    if "twogpu" in cases and _gpu_count() >= 2:
        case("shardkit/2gpu-cpu", "twogpu")
    print(render(results))


def _gpu_count() -> int:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def render(results: dict) -> str:
    """The summary table: seconds, GB/s, ratio to accelerate, ratio to the hardware limit; digests compared."""
    hw = results.get("hardware") or {}
    results.setdefault("bytes", 0)
    total = results["bytes"]
    gpu = (results.get("gpu") or {}).get("shapes", {})
    rows = [("case", "seconds", "GB/s", "x accelerate", "% of limit", "peak RSS GiB", "bitwise = GPU")]

    def add(case, seconds, nbytes, base_seconds, limit_gbs, rss, digest=None, ref=None):
        gbs = nbytes / seconds / 1e9 if seconds else 0
        ratio = f"{base_seconds / seconds:.2f}" if base_seconds and seconds else "-"
        limit = f"{100 * gbs / limit_gbs:.0f}%" if limit_gbs else "-"
        same = "-" if digest is None or ref is None else ("yes" if digest == ref else "NO")
        rows.append((case, f"{seconds:.3f}", f"{gbs:.2f}", ratio, limit, f"{rss / 2**30:.2f}" if rss else "-", same))

    for name, key in (
        ("h2d_pinned", "pinned H2D"),
        ("h2d_pageable", "pageable H2D"),
        ("disk_direct", "disk direct"),
        ("disk_cached", "disk page cache"),
    ):
        if name in hw:
            rows.append((f"limit: {key}", "-", f"{hw[name]:.2f}", "-", "-", "-", "-"))
    for kind, limit_key in (("load-cold", "disk_direct"), ("load-warm", "disk_cached")):
        base = (results.get(f"accelerate/{kind}") or {}).get("seconds")
        for lib in ("accelerate", "shardkit"):
            r = results.get(f"{lib}/{kind}")
            if r:
                add(f"{lib} {kind}", r["seconds"], total, base, hw.get(limit_key), r["peak_rss"])
    for tier, limit_key in (
        ("cpu", "h2d_pinned"),
        ("2gpu-cpu", "h2d_pinned"),
        ("allcpu", "h2d_pinned"),
        ("disk-warm", "disk_cached"),
        ("disk-cold", "disk_direct"),
    ):
        base_r = results.get(f"accelerate/{tier}") or {}
        for lib in ("accelerate", "diffusers", "shardkit"):
            r = results.get(f"{lib}/{tier}")
            if not r:
                continue
            for shape, sr in r["shapes"].items():
                base = (base_r.get("shapes", {}).get(shape) or {}).get("seconds")
                add(
                    f"{lib} {tier} {shape}",
                    sr["seconds"],
                    r["offloaded_bytes"],
                    base,
                    hw.get(limit_key),
                    r["peak_rss"],
                    sr["digest"],
                    (gpu.get(shape) or {}).get("digest"),
                )
    for shape, sr in gpu.items():
        rows.append((f"all on GPU {shape}", f"{sr['seconds']:.3f}", "-", "-", "-", "-", "-"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = [f"checkpoint: {total / 1e9:.2f} GB, {results['layers']} layers; GPU capped at {GPU_CAP / 2**30:.0f} GiB for weights"]
    lines += ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)) for row in rows]
    for lib, tier in (
        ("accelerate", "cpu"),
        ("diffusers", "cpu"),
        ("shardkit", "cpu"),
        ("accelerate", "allcpu"),
        ("shardkit", "allcpu"),
        ("accelerate", "disk-warm"),
        ("shardkit", "disk-warm"),
    ):
        r = results.get(f"{lib}/{tier}")
        if r:
            extra = f", pinning {r['pin_seconds']:.2f} s" if "pin_seconds" in r else ""
            first = next(iter(r["shapes"].values()))
            lines.append(
                f"{lib} {tier} tier: load {r['load_seconds']:.2f} s{extra}, GPU memory beyond resident weights "
                f"{first['gpu_overhead'] / 2**30:.2f} GiB (first shape), peak RSS {r['peak_rss'] / total:.2f}x the weights"
            )
    floor = (results.get("shardkit/load-warm") or {}).get("peak_rss")
    allcpu = results.get("shardkit/allcpu")
    if floor and allcpu:  # what the process costs with nothing on the host, and what the CPU tier adds to it
        lines.append(
            f"process floor (all on the GPU, nothing on the host): {floor / 2**30:.2f} GiB = {floor / total:.2f}x the weights; "
            f"shardkit allcpu adds {(allcpu['peak_rss'] - floor) / allcpu['offloaded_bytes']:.3f}x its CPU-tier bytes"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
