"""MoE offloading benchmark: routed expert fetch against dense block streaming, accelerate and all-on-GPU, in one run.

Builds a seeded Qwen3-MoE-shaped bf16 checkpoint with random weights (hidden 2048, 128 experts, top-8, expert
intermediate 768, vocab 32000; 12 layers hold 14.5 GB of experts), then runs each case in its own process (so its
peak host RSS is its own), every case with the experts of all layers offloaded and everything else on GPU 0:

- ``gpu``: the whole model on the GPU (the reference rate and tokens);
- ``dense``: shardkit streaming each experts block whole (``routed_experts=False``);
- ``routed`` / ``routed-cache``: shardkit copying only the chosen experts, without and with an expert cache of half
  the experts' bytes;
- ``accelerate``: accelerate's ``load_checkpoint_and_dispatch`` with the same map;
- ``disk-dense`` / ``disk-routed``: experts on the disk tier, the checkpoint's pages evicted before every timed
  step (outside the timed span), so each step reads cold pages.

Each case measures greedy decode (batch 1, a 32-token prompt, after a short warm-up generation: the median time of
a decode step, timed at every step) and the time of one 1x512-token prefill, and records the generated tokens:
every case must give the GPU's tokens.

    python scripts/bench_moe.py [--layers 12] [--workdir DIR] [--new-tokens 24] [--cases gpu,dense,...]

Needs a CUDA GPU, transformers 5 and accelerate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import drop_page_cache, peak_rss, run_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, EXPERTS, TOP_K, EXPERT_INTERMEDIATE, VOCAB = 2048, 128, 8, 768, 32000
PROMPT, PREFILL = 32, 512
CASES = ["gpu", "dense", "routed", "routed-cache", "accelerate", "disk-dense", "disk-routed"]
#: Fewer new tokens where each one costs the whole experts' bytes (seconds per token).
SLOW_TOKENS = {"accelerate": 4, "dense": 8, "disk-dense": 3}


def config(layers: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        hidden_size=HIDDEN,
        intermediate_size=6144,
        moe_intermediate_size=EXPERT_INTERMEDIATE,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        vocab_size=VOCAB,
        torch_dtype="bfloat16",
    )


def experts_map(layers: int, tier: str) -> dict:
    return {"": 0, **{f"model.layers.{i}.mlp.experts": tier for i in range(layers)}}


def worker_generate(args) -> dict:
    """Write the checkpoint: random bf16 weights made on the GPU, saved as 4 GB safetensors shards."""
    import torch
    from huggingface_hub import save_torch_state_dict
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen3MoeForCausalLM(config(args.layers)).to(torch.bfloat16)
    model.config.save_pretrained(args.checkpoint)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_torch_state_dict(state, args.checkpoint, max_shard_size="4GB")
    experts = sum(v.numel() * v.element_size() for k, v in state.items() if ".mlp.experts." in k)
    total = sum(v.numel() * v.element_size() for v in state.values())
    return {"bytes": total, "expert_bytes": experts}


def _load(args, case: str):
    import torch
    from transformers import Qwen3MoeForCausalLM

    tier = "disk" if case.startswith("disk") else "cpu"
    if case == "gpu":
        device_map = {"": 0}
    else:
        device_map = experts_map(args.layers, tier)
    if case == "accelerate":
        from accelerate import init_empty_weights, load_checkpoint_and_dispatch

        kwargs = {}
    else:
        from shardkit import init_empty_weights, load_checkpoint_and_dispatch

        kwargs = {"routed_experts": "routed" in case}
        if case == "routed-cache":
            kwargs["expert_cache"] = args.expert_bytes // 2
    with init_empty_weights():
        model = Qwen3MoeForCausalLM(config(args.layers)).to(torch.bfloat16).eval()
    if tier == "disk" and case != "gpu":
        drop_page_cache(args.checkpoint)
    start = time.perf_counter()
    model = load_checkpoint_and_dispatch(
        model, str(args.checkpoint), device_map=device_map, offload_folder=str(args.workdir / "offload"), **kwargs
    )
    torch.cuda.synchronize()
    return model, time.perf_counter() - start


class _StepClock:
    """A stopping criterion that never stops: it times every generation step (after a device sync).

    With ``evict`` (a checkpoint folder) it evicts the folder's pages after each step, outside the timed span, so
    every step of a disk-tier case reads cold pages: else the first step would warm the page cache for the rest.
    """

    def __init__(self, start: float, evict: Path | None = None) -> None:
        self.evict = evict
        self.resumed = start
        self.steps: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        torch.cuda.synchronize()
        self.steps.append(time.perf_counter() - self.resumed)
        if self.evict is not None:
            drop_page_cache(self.evict)
        self.resumed = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def worker_case(args) -> dict:
    import torch
    from transformers import StoppingCriteriaList

    case = args.case
    model, load_seconds = _load(args, case)
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(7)).cuda()
    long = torch.randint(0, VOCAB, (1, PREFILL), generator=torch.Generator().manual_seed(8)).cuda()
    new = SLOW_TOKENS.get(case, args.new_tokens)
    with torch.inference_mode():
        model.generate(prompt[:, :4], max_new_tokens=2, do_sample=False)  # warm-up: kernels, allocator, slabs
        cold = args.checkpoint if case.startswith("disk") else None  # disk cases: every step from cold pages
        if cold:
            drop_page_cache(cold)
        torch.cuda.synchronize()
        clock = _StepClock(time.perf_counter(), cold)
        tokens = model.generate(prompt, max_new_tokens=new, do_sample=False, stopping_criteria=StoppingCriteriaList([clock]))
        steps = clock.steps  # steps[0] is the prompt's prefill
        prefill = []
        for _ in range(2 if case not in SLOW_TOKENS else 1):
            if cold:
                drop_page_cache(cold)
            torch.cuda.synchronize()
            begin = time.perf_counter()
            model(long)
            torch.cuda.synchronize()
            prefill.append(time.perf_counter() - begin)
    decode = sorted(steps[1:])
    streamer = getattr(model, "_shardkit_streamer", None)
    cache = getattr(streamer, "expert_cache", None)
    block = getattr(getattr(model.model.layers[0].mlp.experts, "_shardkit_hook", None), "block", None)
    return {
        "load_s": load_seconds,
        "new_tokens": new,
        "decode_tok_s": 1 / decode[len(decode) // 2],  # the median step
        "decode_steps_s": steps[1:],
        "prompt_s": steps[0],
        "prefill_512_s": min(prefill),
        "tokens": tokens[0, PROMPT:].tolist(),
        "cache": cache.stats() if cache is not None else None,
        "layer0": dict(block.experts.stats) if block is not None and block.experts is not None else None,
        "peak_rss": peak_rss(),
        "gpu_peak": torch.cuda.max_memory_allocated(),
    }


WORKERS = {"generate": worker_generate, "case": worker_case}


def render(results: dict) -> str:
    gpu = results.get("gpu") or {}
    rows = [
        f"Qwen3-MoE-shaped bf16, {results['layers']} layers, {results['bytes'] / 1e9:.1f} GB "
        f"({results['expert_bytes'] / 1e9:.1f} GB experts offloaded); batch 1, {PROMPT}-token prompt, greedy",
        f"{'case':<14} {'decode tok/s':>12} {'x GPU':>7} {'x dense':>8} {'x accel':>8} {'prefill 512':>12} "
        f"{'hit rate':>9} {'peak RSS':>9}  tokens",
    ]
    dense = (results.get("dense") or {}).get("decode_tok_s")
    accel = (results.get("accelerate") or {}).get("decode_tok_s")
    disk_dense = (results.get("disk-dense") or {}).get("decode_tok_s")
    for case in CASES:
        r = results.get(case)
        if r is None:
            continue
        if "error" in r:
            rows.append(f"{case:<14} failed: {r['error']}")
            continue
        rate = r["decode_tok_s"]
        base = disk_dense if case.startswith("disk") else dense
        reference = gpu.get("tokens", [])
        shared = min(len(reference), len(r["tokens"]))
        same = r["tokens"][:shared] == reference[:shared] if gpu else None
        rows.append(
            f"{case:<14} {rate:>12.2f} {rate / gpu['decode_tok_s'] if gpu else float('nan'):>7.2f} "
            f"{rate / base if base else float('nan'):>8.2f} {rate / accel if accel else float('nan'):>8.1f} "
            f"{r['prefill_512_s']:>11.3f}s "
            f"{(r['cache'] or {}).get('hit_rate', float('nan')):>9.2f} {r['peak_rss'] / 2**30:>8.1f}G  "
            f"{'same as GPU' if same else 'DIFFERENT' if same is False else ''}"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / ".bench"))
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", help="results JSON (default: WORKDIR/moe-<layers>l.json), rewritten after each case")
    parser.add_argument("--case-timeout", type=int, default=300)
    parser.add_argument("--worker")
    parser.add_argument("--case")
    parser.add_argument("--expert-bytes", type=int, default=0)
    args = parser.parse_args()
    args.workdir = Path(args.workdir)
    args.checkpoint = args.workdir / f"qwen3moe-{args.layers}l"

    if args.worker:
        print("RESULT " + json.dumps(WORKERS[args.worker](args)), flush=True)
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or args.workdir / f"moe-{args.layers}l.json")
    results: dict = {"layers": args.layers}

    def run(name: str, **extra) -> dict:
        command = [sys.executable, __file__, "--worker", name, "--workdir", str(args.workdir), "--layers", str(args.layers)]
        command += ["--new-tokens", str(args.new_tokens)]
        for key, value in extra.items():
            command += [f"--{key.replace('_', '-')}", str(value)]
        result, tail = run_result(command, args.case_timeout)
        return result if result is not None else {"error": " | ".join(tail[-3:])}

    made = run("generate") if not (args.checkpoint / "config.json").exists() else None
    if made is not None and "error" in made:
        sys.exit(f"could not build the checkpoint: {made['error']}")
    results["bytes"] = sum(p.stat().st_size for p in args.checkpoint.glob("*.safetensors"))
    results["expert_bytes"] = (made or {}).get("expert_bytes") or _expert_bytes(args.checkpoint)
    for case in args.cases.split(","):
        results[case] = run("case", case=case, expert_bytes=results["expert_bytes"])
        out.write_text(json.dumps(results, indent=2))
        print(f"{case}: {json.dumps({k: v for k, v in results[case].items() if k != 'tokens'})}", flush=True)
    print(render(results))


def _expert_bytes(folder: Path) -> int:
    import shardkit

    return sum(e.nbytes for e in shardkit.open_checkpoint(folder) if ".mlp.experts." in e.name)


if __name__ == "__main__":
    main()
