"""``shardkit plan CHECKPOINT --max-memory 0=20GiB,cpu=64GiB``: where each block would go, and each device's bytes."""

from __future__ import annotations

import click

from ..errors import UsageError
from ..units import format_size
from . import emit_json


def parse_max_memory(text: str) -> dict:
    """``"0=20GiB,cpu=64GiB"`` -> ``{"0": "20GiB", "cpu": "64GiB"}`` (normalized later)."""
    result = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        device, sep, size = part.partition("=")
        if not sep or not device.strip() or not size.strip():
            raise UsageError(f"cannot read {part!r} in --max-memory: write DEVICE=SIZE, e.g. 0=20GiB,cpu=64GiB")
        result[device.strip()] = size.strip()
    if not result:
        raise UsageError("--max-memory is empty: write e.g. 0=20GiB,cpu=64GiB")
    return result


@click.command("plan")
@click.argument("checkpoint")
@click.option(
    "--max-memory", "max_memory", required=True, help="Budget per device: 0=20GiB,1=20GiB,cpu=64GiB (disk takes the rest)."
)
@click.option("--dtype", help="Dtype the floating weights will be loaded in (bf16, fp16, fp32).")
@click.option("--model-config", "model_config", help="A transformers config.json (or its folder): plan on the real module tree.")
@click.option("--no-split", "no_split", multiple=True, help="Module class never to split across devices (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_command(
    checkpoint: str, max_memory: str, dtype: str | None, model_config: str | None, no_split: tuple[str, ...], as_json: bool
) -> None:
    """Print the device map shardkit would use for CHECKPOINT within --max-memory, and each device's bytes.

    Without --model-config the plan comes from the checkpoint's headers alone (no torch import): tensors are
    grouped into the repeated blocks their names reveal (model.layers.N, h.N, encoder.layer.N).
    """
    from ..bigmodel.placement import normalize_max_memory, plan
    from ..dtypes import parse_dtype
    from ..reader import open_checkpoint

    budget = normalize_max_memory(parse_max_memory(max_memory))
    dtype = parse_dtype(dtype) if dtype else None
    if model_config:
        device_map, sizes = _plan_from_config(model_config, budget, dtype, list(no_split))
        source = "config"
    else:
        from ..bigmodel.headers import REPEATED, checkpoint_tree
        from ..formats.dcp import model_weights

        root, sizes, tied = checkpoint_tree(model_weights(open_checkpoint(checkpoint))[0], dtype)
        device_map = plan(root, sizes, budget, {REPEATED, *no_split}, tied)
        source = "headers"
    per_device: dict[str, int] = {}
    for key, device in device_map.items():
        per_device[str(device)] = per_device.get(str(device), 0) + sizes.get(key, 0)
    notes = _absent_gpu_notes(budget)
    result = {
        "source": source,
        "device_map": {k: device_map[k] for k in device_map},
        "bytes": per_device,
        "total_bytes": sizes.get("", 0),
        "notes": notes,
    }
    if as_json:
        emit_json(result)
        return
    width = max((len(k or "(all)") for k in device_map), default=0)
    for key, device in device_map.items():
        click.echo(f"{key or '(all)':<{width}}  {device!s:>5}  {format_size(sizes.get(key, 0)):>10}")
    click.echo("")
    for device, nbytes in per_device.items():
        click.echo(f"{device:>5}  {format_size(nbytes):>10}  ({nbytes:,} bytes)")
    for note in notes:
        click.echo(f"note: {note}", err=True)


def visible_gpus() -> int:
    """GPUs a load on this machine could use, without importing torch for a plan from headers.

    With torch already imported (a plan from a config), torch's own count; otherwise the NVIDIA driver's
    ``/proc/driver/nvidia/gpus`` entries, limited by ``CUDA_VISIBLE_DEVICES``.
    """
    import os
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        count = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = min(count, len([d for d in visible.split(",") if d.strip() and not d.strip().startswith("-")]))
    return count


def _absent_gpu_notes(budget: dict) -> list[str]:
    """A plan may be made here for a GPU machine elsewhere: say so, don't refuse."""
    gpus = [d for d in budget if isinstance(d, int)]
    if not gpus:
        return []
    count = visible_gpus()
    absent = [d for d in gpus if d >= count]
    if not absent:
        return []
    have = f"{count} GPU{'s' if count != 1 else ''}" if count else "no CUDA GPU"
    names = ", ".join(map(str, absent))
    load = "a load here with this budget drops it, with a warning, and plans on the CPU and disk"
    return [f"planned for GPU {names}, which this machine lacks ({have}): {load}"]


def _plan_from_config(path: str, budget: dict, dtype: str | None, no_split: list[str]):
    from ..bigmodel.devicemap import infer_auto_device_map
    from ..bigmodel.empty import empty_model_from_config
    from ..bigmodel.measure import compute_module_sizes
    from ..dtypes import torch_dtype

    model = empty_model_from_config(path)
    no_split = no_split or list(getattr(model, "_no_split_modules", None) or [])
    dt = torch_dtype(dtype) if dtype else None
    return infer_auto_device_map(model, budget, no_split, dt), compute_module_sizes(model, dtype=dt)
