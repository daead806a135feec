"""Moving a forward's inputs and outputs between devices: tensors inside any nesting of tuples, lists and dicts."""

from __future__ import annotations

import torch


def move(obj, device, skip: frozenset = frozenset()):
    """``obj`` with every tensor inside tuples, lists and dicts on ``device`` (other objects untouched)."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=device.type == "cuda")
    if type(obj) is dict:
        return {k: v if k in skip else move(v, device) for k, v in obj.items()}
    if isinstance(obj, dict):  # ModelOutput and friends: update in place, they may not be rebuildable from a dict
        for key in list(obj.keys()):
            if key not in skip:
                obj[key] = move(obj[key], device)
        return obj
    if isinstance(obj, tuple):
        items = [move(x, device) for x in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        return [move(x, device) for x in obj]
    return obj


__all__ = ["move"]
