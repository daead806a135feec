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
@click.option(
    "--experts-offload",
    "experts_offload",
    is_flag=True,
    help="Mixture of experts: everything but routed experts on the main device, whole layers' experts offloaded first.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan_command(
    checkpoint: str,
    max_memory: str,
    dtype: str | None,
    model_config: str | None,
    no_split: tuple[str, ...],
    experts_offload: bool,
    as_json: bool,
) -> None:
    """Print the device map shardkit would use for CHECKPOINT within --max-memory, and each device's bytes.

    Without --model-config the plan comes from the checkpoint's headers alone (no torch import): tensors are
    grouped into the repeated blocks their names reveal (model.layers.N, h.N, encoder.layer.N).
    """
    from ..bigmodel.placement import normalize_max_memory
    from ..bigmodel.planning import plan_device_map

    budget = normalize_max_memory(parse_max_memory(max_memory))
    planned = plan_device_map(
        checkpoint, budget, dtype=dtype, model_config=model_config, no_split=no_split, experts_offload=experts_offload
    )
    device_map, sizes, experts, memory = planned.device_map, planned.sizes, planned.experts, planned.memory
    per_device, source = planned.per_device, planned.source
    notes = _absent_gpu_notes(budget) + _over_budget_notes(memory, budget)
    result = {
        "source": source,
        "device_map": {k: device_map[k] for k in device_map},
        "bytes": per_device,
        "total_bytes": sizes.get("", 0),
        "memory": memory,
        "notes": notes,
    }
    if planned.moe is not None:
        result["moe"] = planned.moe
    if as_json:
        emit_json(result)
        return
    width = max((len(k or "(all)") for k in device_map), default=0)
    for key, device in device_map.items():
        click.echo(f"{key or '(all)':<{width}}  {device!s:>5}  {format_size(sizes.get(key, 0)):>10}")
    click.echo("")
    for device, nbytes in per_device.items():
        click.echo(f"{device:>5}  {format_size(nbytes):>10}  ({nbytes:,} bytes)")
    moe = result.get("moe")
    if moe:
        click.echo("")
        click.echo(f"mixture of experts: {len(experts)} experts modules, top-{moe['top_k'] or '?'} routing")
        click.echo(f"decode step, bytes copied per token: {format_size(moe['dense_bytes_per_token'])} streaming blocks whole")
        if moe["routed_bytes_per_token"] is not None:
            click.echo(f"                                     {format_size(moe['routed_bytes_per_token'])} with routed fetch")
        else:
            click.echo("  (pass --model-config, or keep config.json beside the checkpoint, for the routed figure)")
    click.echo("")
    for line in _memory_lines(memory):
        click.echo(line)
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


def _memory_lines(memory: dict) -> list[str]:
    """The memory a load and its forwards hold, host first, as the dispatcher's rules give it."""
    host = memory["host"]
    size = format_size
    parts = [f"{size(host['weights'])} CPU-tier weights"]
    if host["staging"]:
        parts.append(f"{size(host['staging'])} staging slab")
    if host["disk_ring"]:
        parts.append(f"{size(host['disk_ring'])} pinned disk read ring")
    lines = [
        f"host memory: {' + '.join(parts)} = {size(host['run'])} while running; "
        f"{size(host['load'])} while loading (read buffers {size(host['load_buffers'])})"
    ]
    for device, gpu in memory["gpus"].items():
        staging = f" + {size(gpu['staging'])} staging slabs" if gpu["staging"] else ""
        lines.append(f"GPU {device}: {size(gpu['weights'])} weights{staging} = {size(gpu['total'])}")
    return lines


def _over_budget_notes(memory: dict, budget: dict) -> list[str]:
    """The budget covers weights and streaming room; say so when the load's read buffers go beyond it."""
    limit = budget.get("cpu")
    peak = memory["host"]["peak"]
    if limit is None or peak <= limit:
        return []
    return [f"host memory peaks at {format_size(peak)}, {format_size(peak - limit)} over the cpu budget (read buffers)"]
