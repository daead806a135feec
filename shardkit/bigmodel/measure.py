"""Measure a (possibly meta) ``nn.Module``: bytes per module prefix, its tree for planning, its tied parameters."""

from __future__ import annotations

from collections import defaultdict

from .placement import Node


def as_torch_dtype(dtype):
    """``"bf16"``, ``"torch.float16"``, ``"F32"`` or a ``torch.dtype`` -> ``torch.dtype`` (None stays None)."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    from ..dtypes import parse_dtype, torch_dtype

    return torch_dtype(parse_dtype(str(dtype)))


def is_castable(dtype) -> bool:
    """Loading with a ``dtype`` casts floating-point tensors only; integers, bools and complex keep theirs."""
    return dtype.is_floating_point


def tensor_size(tensor, dtype=None, *, never_grow: bool = False) -> int:
    """Bytes ``tensor`` will take once loaded with ``dtype`` (floating tensors take ``dtype``'s size).

    ``never_grow=True`` is accelerate's rule (a cast is assumed never to grow a tensor), which undercounts an
    fp16 model loaded as fp32.
    """
    own = tensor.element_size()
    if dtype is None or not is_castable(tensor.dtype):
        return tensor.numel() * own
    target = dtype.itemsize
    return tensor.numel() * (min(own, target) if never_grow else target)


def compute_module_sizes(
    model, dtype=None, special_dtypes: dict | None = None, buffers_only: bool = False, *, never_grow: bool = False
) -> dict[str, int]:
    """``{prefix: bytes}`` for every module and tensor name prefix (``""`` is the whole model).

    Parameters are counted once however many names they have (tied weights); every buffer counts. ``dtype`` is
    the dtype floating tensors will be loaded in, ``special_dtypes`` per-tensor overrides.
    """
    dtype = as_torch_dtype(dtype)
    special = {k: as_torch_dtype(v) for k, v in (special_dtypes or {}).items()}
    sizes: dict[str, int] = defaultdict(int)
    tensors = list(model.named_buffers()) if buffers_only else [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        if name in special:
            size = tensor.numel() * special[name].itemsize
        else:
            size = tensor_size(tensor, dtype, never_grow=never_grow)
        parts = name.split(".")
        for depth in range(len(parts) + 1):
            sizes[".".join(parts[:depth])] += size
    return sizes


def module_tree(model, prefix: str = "") -> Node:
    """The planning tree of ``model``: per module, direct parameters, then child modules, then direct buffers."""
    join = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
    children = [Node(join(n), None) for n, _ in model.named_parameters(recurse=False)]
    children += [module_tree(child, join(n)) for n, child in model.named_children()]
    children += [Node(join(n), None) for n, _ in model.named_buffers(recurse=False)]
    return Node(prefix, type(model).__name__, children)


def find_tied_parameters(model, **_ignored) -> list[list[str]]:
    """Groups of parameter names that are one tensor (tied weights), each sorted, e.g. ``[["lm_head.weight", "
    ""model.embed_tokens.weight"]]``."""
    by_identity: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_identity.setdefault(id(param), []).append(name)
    return [sorted(set(names)) for names in by_identity.values() if len(set(names)) > 1]


#: Parameters whose 3-D presence marks a transformers 5 experts container (``[experts, out, in]``).
EXPERT_MARKERS = ("gate_up_proj", "up_proj")


def is_experts_module(module) -> bool:
    """Whether ``module`` holds packed expert weights (a 3-D ``gate_up_proj`` or ``up_proj``)."""
    params = getattr(module, "_parameters", {})
    return any(params.get(m) is not None and params[m].dim() == 3 for m in EXPERT_MARKERS)


def expert_modules(model) -> dict[str, int]:
    """``{name: number of experts}`` for ``model``'s experts containers (see :func:`is_experts_module`), in
    module order."""
    found = {}
    for name, module in model.named_modules():
        if is_experts_module(module):
            weight = next(module._parameters[m] for m in EXPERT_MARKERS if module._parameters.get(m) is not None)
            found[name] = weight.shape[0]
    return found
