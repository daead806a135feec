"""Where a load's time and a process's host memory go: phases of shardkit's loader, each case in a fresh process.

    python scripts/profile_load.py --checkpoint DIR [--layers 16] [--cases gpu,allcpu,...] [--out profile.json]

DIR is the Llama-shaped checkpoint ``scripts/bench_gpu.py`` builds (``--worker generate``). Cases:

* ``gpu``, ``gpu-cold``: the whole checkpoint onto GPU 0, warm or cold page cache: seconds per loader phase.
* ``gpu-reserved``: the same after the CUDA caching allocator already holds one segment of the model's size
  (what the load costs without per-tensor ``cudaMalloc``).
* ``gpu-twice``: two loads in one process (the second pays no process set-up).
* ``allcpu``: every layer and the head on the CPU tier: phases, forwards, then host memory by stage;
  ``allcpu-read8x8`` and ``allcpu-read16x8`` the same with other piece sizes and thread counts for its reads.
* ``pin``: pinned memory for eight 404 MiB regions: as before (``cudaHostRegister`` faults fresh pages) and as
  ``slab.allocate`` does it now (huge pages faulted in from several threads first); then a fill as the loader reads.
* ``floor``: host memory of torch, a CUDA context, the first kernels and transformers' Llama, stage by stage.
* ``coldread``: buffered reads of a cold page cache at several piece sizes and thread counts, with and without
  ``POSIX_FADV_WILLNEED`` ahead of the readers, against O_DIRECT.

Prints one line per case and writes every figure to --out. Diagnostics only: the comparisons against accelerate
and the hardware limits are ``scripts/bench_gpu.py``'s.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu  # noqa: E402  (the checkpoint's model, inputs, page-cache helpers and worker runner)


def memory() -> dict:
    """This process's resident memory in MiB, split as the kernel counts it, and its peak so far."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                fields[key] = int(value.split()[0]) // 1024
    return fields


def phase_timer() -> dict:
    """Wrap the loader's phases so each records its seconds and calls; returns the (live) record."""
    from shardkit.bigmodel import dispatch, loader, readahead, slab

    record: dict = defaultdict(float)

    def wrap(module, name: str, label: str | None = None) -> None:
        original = getattr(module, name)
        label = label or name

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                record[label] += time.perf_counter() - start
                record[label + " calls"] += 1

        setattr(module, name, timed)

    wrap(loader, "open_checkpoint")
    wrap(loader, "model_tensors")
    wrap(loader, "_allocate")
    wrap(loader, "_stream")
    wrap(loader, "read_direct")
    wrap(loader, "_install")
    wrap(slab, "allocate", "slab.allocate")
    wrap(readahead.ReadAhead, "__init__", "ReadAhead.__init__")
    wrap(readahead.ReadAhead, "close", "ReadAhead.close")
    wrap(dispatch, "load_checkpoint_in_model")
    wrap(dispatch, "dispatch_model")
    return record


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device():
    """GPU 0, or the CPU where there is none (so the script can be tried on a laptop with a small checkpoint)."""
    import torch

    return 0 if torch.cuda.is_available() else "cpu"


def _load(folder: Path, layers: int, device_map):
    """Seconds to load ``folder`` into a fresh empty model with ``device_map``, and the model."""
    import torch

    import shardkit

    model = bench_gpu.empty_model(shardkit, layers)
    _sync()
    start = time.perf_counter()
    shardkit.load_checkpoint_and_dispatch(
        model, str(folder), device_map=device_map, dtype=torch.bfloat16, no_split_module_classes=["LlamaDecoderLayer"]
    )
    _sync()
    return time.perf_counter() - start, model


def _forward(model):
    import torch

    with torch.inference_mode():
        model(bench_gpu.inputs(bench_gpu.SHAPES["128tok"], device="cuda" if torch.cuda.is_available() else "cpu"))
    _sync()


def case_gpu(args, cold=False, reserved=False, twice=False) -> dict:
    import torch

    stages = {"start": memory()}
    torch.empty(1, device=_device())
    stages["cuda"] = memory()
    import transformers  # noqa: F401

    stages["transformers"] = memory()
    folder = Path(args.checkpoint)
    record = phase_timer()
    if reserved:
        total = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        start = time.perf_counter()
        block = torch.empty(total + (64 << 20), dtype=torch.uint8, device=_device())
        _sync()
        reserve_seconds = time.perf_counter() - start
        del block
    (bench_gpu.drop_page_cache if cold else bench_gpu.warm_page_cache)(folder)
    seconds, model = _load(folder, args.layers, {"": _device()})
    result = {"seconds": seconds, "phases": dict(record)}
    if reserved:
        result["reserve_seconds"] = reserve_seconds
    stages["loaded"] = memory()
    _forward(model)
    stages["forward"] = memory()
    if twice:
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        record.clear()
        bench_gpu.warm_page_cache(folder)
        result["second_seconds"], model = _load(folder, args.layers, {"": _device()})
        result["second_phases"] = dict(record)
    result["memory"] = stages
    return result


def case_allcpu(args, piece: int | None = None, threads: int | None = None) -> dict:
    import functools

    import torch

    from shardkit.bigmodel import loader

    if piece:  # the CPU tier's direct reads with other piece size and thread count
        loader.read_direct = functools.partial(loader.read_direct, piece=piece, threads=threads)

    stages = {"start": memory()}
    torch.empty(1, device=_device())
    import transformers  # noqa: F401

    stages["cuda+transformers"] = memory()
    folder = Path(args.checkpoint)
    record = phase_timer()
    bench_gpu.warm_page_cache(folder)
    gpu = _device()
    device_map = {"model.embed_tokens": gpu, "model.layers": "cpu", "model.norm": gpu, "model.rotary_emb": gpu, "lm_head": "cpu"}
    seconds, model = _load(folder, args.layers, device_map)
    stages["loaded"] = memory()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        _forward(model)
        times.append(time.perf_counter() - start)
        stages[f"forward{len(times)}"] = memory()
    host = sum(buffer.numel() for buffer, _ in (getattr(model, "_shardkit_host", None) or {}).values())
    return {"seconds": seconds, "phases": dict(record), "forwards": times, "cpu_tier_mib": host // 2**20, "memory": stages}


def case_pin(args) -> dict:
    """Pinned host memory for 8 regions of one decoder layer's size, as before and as now; then a fill as the loader reads."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from shardkit.bigmodel import slab

    torch.empty(1, device="cuda")
    cudart = torch.cuda.cudart()
    size, count = 404 * 2**20, 8
    files = sorted(Path(args.checkpoint).glob("*.safetensors"))
    bench_gpu.warm_page_cache(Path(args.checkpoint))
    fd = os.open(files[0], os.O_RDONLY)

    def fill(tensor) -> None:  # the same fill after either variant: 16 MiB reads from four threads
        view = memoryview(tensor.numpy())
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda s: os.preadv(fd, [view[s : s + (16 << 20)]], s), range(0, size, 16 << 20)))

    def old_way():  # before: registration faults the fresh pages itself
        region = slab._PinnedRegion(-1, size)
        tensor = torch.frombuffer(region, dtype=torch.uint8)
        assert int(cudart.cudaHostRegister(tensor.data_ptr(), size, 0)) == 0
        region.registered, region.unregister = tensor.data_ptr(), cudart.cudaHostUnregister
        return tensor

    result = {}
    for variant, make in (("old: register faults", old_way), ("now: slab.allocate", lambda: slab.allocate(size, pin=True))):
        steps: dict = defaultdict(float)
        tensors = []
        for _ in range(count):
            start = time.perf_counter()
            tensors.append(make())
            steps["allocate"] += time.perf_counter() - start
            start = time.perf_counter()
            fill(tensors[-1])
            steps["fill"] += time.perf_counter() - start
        result[variant] = {k: round(v, 4) for k, v in steps.items()} | {
            "GB/s": round(count * size / sum(steps.values()) / 1e9, 2)
        }
        del tensors
    os.close(fd)
    return result


def case_floor(args) -> dict:
    """Host memory of torch + CUDA alone, stage by stage: the part of any GPU process no loader controls."""
    import torch
    import torch.nn.functional as F

    stages = {"torch": memory()}
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    stages["cuda context"] = memory()
    (a @ a).sum().item()
    stages["bf16 matmul (cuBLAS)"] = memory()
    q = torch.randn(1, 32, 128, 128, device="cuda", dtype=torch.bfloat16)
    F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().item()
    stages["sdpa"] = memory()
    F.silu(a).sum().item()
    torch.nn.functional.embedding(torch.arange(8, device="cuda"), a).sum().item()
    stages["silu, embedding"] = memory()
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    stages["transformers Llama"] = memory()
    return stages


def read_files(files: list[Path], piece: int, threads: int, direct: bool, willneed: bool) -> float:
    """GB/s reading ``files`` whole, the loader's way: each of ``threads`` threads takes the next piece in file order."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    buffers = [mmap.mmap(-1, piece) for _ in range(threads)]
    fds = [os.open(p, os.O_RDONLY | (os.O_DIRECT if direct else 0)) for p in files]
    cursor = iter([(fd, start) for fd, p in zip(fds, files) for start in range(0, p.stat().st_size, piece)])
    lock = threading.Lock()

    def reader(index: int) -> None:
        while True:
            with lock:
                item = next(cursor, None)
            if item is None:
                return
            if willneed:  # ask the kernel to start reading what the next round of pieces will need
                os.posix_fadvise(item[0], item[1] + threads * piece, piece, os.POSIX_FADV_WILLNEED)
            os.preadv(item[0], [buffers[index]], item[1])

    start = time.perf_counter()
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(reader, range(threads)))
    finally:
        for fd in fds:
            os.close(fd)
    return sum(p.stat().st_size for p in files) / (time.perf_counter() - start) / 1e9


def case_coldread(args) -> dict:
    """Cold buffered reads of the first two shards: piece size x threads, with and without WILLNEED, against O_DIRECT."""
    folder = Path(args.checkpoint)
    files = sorted(folder.glob("*.safetensors"))[:2]
    result = {}
    for piece, threads, direct, willneed in (
        (8 << 20, 8, False, False),
        (16 << 20, 8, False, False),
        (32 << 20, 16, False, False),
        (8 << 20, 8, False, True),
        (16 << 20, 8, False, True),
        (64 << 20, 16, True, False),
    ):
        bench_gpu.drop_page_cache(folder)
        label = f"{'direct' if direct else 'buffered'} {piece >> 20}MiB x{threads}{' willneed-ahead' if willneed else ''}"
        result[label] = round(read_files(files, piece, threads, direct, willneed), 3)
    return result


CASES = {
    "gpu": lambda a: case_gpu(a),
    "gpu-reserved": lambda a: case_gpu(a, reserved=True),
    "gpu-twice": lambda a: case_gpu(a, twice=True),
    "gpu-cold": lambda a: case_gpu(a, cold=True),
    "allcpu": case_allcpu,
    "pin": case_pin,
    "floor": case_floor,
    "allcpu-read8x8": lambda a: case_allcpu(a, piece=8 << 20, threads=8),
    "allcpu-read16x8": lambda a: case_allcpu(a, piece=16 << 20, threads=8),
    "coldread": case_coldread,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--cases", default="gpu,gpu-cold,allcpu,allcpu-read8x8,allcpu-read16x8,pin,floor,coldread")
    parser.add_argument("--out")
    parser.add_argument("--case")
    args = parser.parse_args()
    if args.case:
        print("RESULT " + json.dumps(CASES[args.case](args)), flush=True)
        return
    results = {}
    for name in args.cases.split(","):
        command = [sys.executable, __file__, "--case", name, "--checkpoint", args.checkpoint, "--layers", str(args.layers)]
        started = time.perf_counter()
        result, tail = bench_gpu.run_result(command, timeout=300)
        results[name] = result if result is not None else {"failed": tail}
        print(f"[{time.perf_counter() - started:5.1f}s] {name}: {json.dumps(results[name])}", flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
