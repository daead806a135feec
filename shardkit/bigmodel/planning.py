"""``plan_device_map()``: the device map a load would use within a budget, and what it costs per device.

The library face of ``shardkit plan``: from a checkpoint's headers alone (no torch), or from a transformers
config.json built on the meta device. The CLI only renders the result.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..errors import UsageError
from ..table import Checkpoint


@dataclass
class DevicePlan:
    """A device map and its bytes: ``sizes`` per module prefix (``""`` the whole model), ``per_device`` totals,
    ``memory`` (what :func:`~shardkit.bigmodel.placement.memory_needs` reports), the ``experts`` modules found."""

    source: Literal["headers", "config"]
    device_map: dict
    sizes: dict[str, int]
    per_device: dict[str, int]
    memory: dict
    experts: dict = field(default_factory=dict)
    #: mixture of experts: ``top_k`` and the bytes a decode step copies per token, blocks whole and routed
    moe: dict | None = None

    @property
    def total_bytes(self) -> int:
        return self.sizes.get("", 0)


def plan_device_map(
    checkpoint: str | os.PathLike[str] | Checkpoint,
    max_memory: dict,
    *,
    dtype: str | None = None,
    model_config: str | os.PathLike[str] | None = None,
    no_split: Sequence[str] = (),
    experts_offload: bool = False,
) -> DevicePlan:
    """The device map for ``checkpoint`` within ``max_memory`` (``{0: "20GiB", "cpu": "64GiB"}``, normalized).

    Without ``model_config`` the plan comes from the checkpoint's headers alone (no torch import): tensors are
    grouped into the repeated blocks their names reveal (``model.layers.N``, ``h.N``, ``encoder.layer.N``);
    ``no_split`` adds module classes never split across devices. ``dtype`` is the dtype the floating weights will
    be loaded in. ``experts_offload`` keeps mixture-of-experts modules off the GPU (routed fetch).
    """
    from ..dtypes import parse_dtype
    from ..reader import open_checkpoint
    from .placement import memory_needs, normalize_max_memory, plan

    budget = normalize_max_memory(max_memory)
    dtype = parse_dtype(dtype) if dtype else None
    table = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    source: Literal["headers", "config"]
    if model_config:
        device_map, sizes, experts, root, classes = _plan_from_config(
            os.fspath(model_config), budget, dtype, list(no_split), experts_offload
        )
        source, config_path = "config", os.fspath(model_config)
    else:
        from ..formats.dcp import model_weights
        from .headers import REPEATED, checkpoint_tree
        from .placement import experts_in_tree, plan_experts

        opened = model_weights(table)[0]
        root, sizes, tied = checkpoint_tree(opened, dtype)
        experts = experts_in_tree(root, {e.name: tuple(e.shape) for e in opened})
        classes = {REPEATED, *no_split}
        if experts_offload:
            if not experts:
                raise UsageError(f"--experts-offload: {opened.root} holds no experts modules (mlp.experts, experts.N)")
            device_map = plan_experts(root, sizes, budget, list(experts))
        else:
            device_map = plan(root, sizes, budget, classes, tied)
        source, config_path = "headers", opened.root
    per_device: dict[str, int] = {}
    for key, device in device_map.items():
        per_device[str(device)] = per_device.get(str(device), 0) + sizes.get(key, 0)
    rewrite = dtype is not None or any(f.format != "safetensors" for f in table.files)
    memory = memory_needs(root, sizes, device_map, classes, rewrite=rewrite)
    moe = _moe_traffic(device_map, sizes, experts, budget, config_path) if experts else None
    return DevicePlan(source, dict(device_map), sizes, per_device, memory, experts or {}, moe)


def _moe_traffic(device_map: dict, sizes: dict, experts: dict, budget: dict, config_path: str | None) -> dict:
    """What a decode step copies with and without routed fetch; top-k from the model's config.json (a file, or
    the folder holding it)."""
    import orjson

    from .placement import decode_traffic

    top_k = None
    if config_path:
        path = os.path.join(config_path, "config.json") if os.path.isdir(config_path) else config_path
        try:
            with open(path, "rb") as handle:
                config = orjson.loads(handle.read())
            top_k = next(
                (config[k] for k in ("num_experts_per_tok", "moe_topk", "top_k") if isinstance(config.get(k), int)), None
            )
        except (OSError, orjson.JSONDecodeError, AttributeError):
            top_k = None
    main = next((d for d in budget if d not in ("cpu", "disk")), "cpu")
    traffic = decode_traffic(device_map, sizes, experts, top_k, main)
    return {
        "experts_modules": len(experts),
        "top_k": top_k,
        "dense_bytes_per_token": traffic["dense"],
        "routed_bytes_per_token": traffic["routed"],
    }


def _plan_from_config(path: str, budget: dict, dtype: str | None, no_split: list[str], experts_offload: bool = False):
    from ..dtypes import torch_dtype
    from .devicemap import infer_auto_device_map
    from .empty import empty_model_from_config
    from .measure import compute_module_sizes, expert_modules, module_tree

    model = empty_model_from_config(path)
    no_split = no_split or list(getattr(model, "_no_split_modules", None) or [])
    dt = torch_dtype(dtype) if dtype else None
    experts = expert_modules(model)
    device_map = infer_auto_device_map(model, budget, no_split, dt, experts_offload=experts_offload)
    return device_map, compute_module_sizes(model, dtype=dt), experts, module_tree(model), set(no_split)


__all__ = ["DevicePlan", "plan_device_map"]
