"""Device maps for ``nn.Module`` models, under accelerate's names and signatures.

A device map is ``{module or tensor name: device}`` with devices GPU indexes, ``"cpu"`` and ``"disk"``; a key
covers its whole subtree (``""`` is the whole model) and the map must cover every tensor.
"""

from __future__ import annotations

import logging
import warnings

from ..errors import UsageError
from . import placement
from .measure import compute_module_sizes, expert_modules, find_tied_parameters, module_tree

logger = logging.getLogger(__name__)

DEVICE_MAP_STRINGS = ("auto", "balanced", "balanced_low_0", "sequential")


def get_max_memory(max_memory: dict | None = None) -> dict:
    """``max_memory`` with sizes parsed and devices ordered (GPUs, ``"cpu"``, ``"disk"``).

    Without one: the free memory of every visible GPU and the available RAM, nothing held back.
    """
    if max_memory is not None:
        return placement.normalize_max_memory(max_memory)
    import psutil
    import torch

    found: dict = {}
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            found[index] = torch.cuda.mem_get_info(index)[0]
    found["cpu"] = psutil.virtual_memory().available
    return found


def _no_split(classes) -> set[str]:
    if classes is None:
        return set()
    return {classes} if isinstance(classes, str) else set(classes)


def get_balanced_memory(
    model, max_memory: dict | None = None, no_split_module_classes=None, dtype=None, special_dtypes=None, low_zero: bool = False
) -> dict:
    """A ``max_memory`` that spreads ``model`` evenly over the GPUs (accelerate's rule; see :func:`placement.balanced_memory`).

    With a single GPU and no ``max_memory`` given, 10% of it is left for activations.
    """
    sizes = compute_module_sizes(model, dtype=dtype, special_dtypes=special_dtypes)
    return placement.balanced_memory(
        module_tree(model),
        sizes,
        get_max_memory(max_memory),
        _no_split(no_split_module_classes),
        low_zero=low_zero,
        user_set=max_memory is not None,
    )


def infer_auto_device_map(
    model,
    max_memory: dict | None = None,
    no_split_module_classes=None,
    dtype=None,
    special_dtypes: dict | None = None,
    verbose: bool = False,
    clean_result: bool = True,
    offload_buffers: bool = False,
    fallback_allocation: bool = False,
    *,
    match_accelerate: bool = False,
    experts_offload: bool = False,
) -> dict:
    """Place ``model`` on the GPUs in order, then the CPU, then the disk (accelerate's greedy walk).

    Differences from accelerate, each deliberate: room for streaming offloaded layers is held back only when
    something is offloaded, and it is the dispatcher's real need (two staging slabs on the main device, two read
    buffers on the CPU when the disk is used) rather than one layer always; a ``dtype`` that grows tensors (fp16
    loaded as fp32) is counted at its real size. ``match_accelerate=True`` gives accelerate's map exactly.
    Buffers are always counted with their module; without ``offload_buffers``, a warning says when the buffers
    of offloaded modules (which then live on the main device) do not fit beside what the map puts on any GPU, as
    accelerate's does. ``fallback_allocation=True`` is accelerate's: a GPU (or the CPU) that would get nothing
    gets the first module, breadth first, that fits beside the held-back room. Devices left empty are logged
    (INFO, with the least each would have needed).

    ``experts_offload=True`` (mixture-of-experts models) keeps everything but the routed experts on the main
    device and offloads experts first, whole layers' experts at a time (see :func:`placement.plan_experts`).
    """
    sizes = compute_module_sizes(model, dtype=dtype, special_dtypes=special_dtypes, never_grow=match_accelerate)
    if experts_offload:
        experts = expert_modules(model)
        if not experts:
            raise UsageError(f"experts_offload: {type(model).__name__} has no experts modules (3-D gate_up_proj/up_proj weights)")
        return placement.plan_experts(module_tree(model), sizes, get_max_memory(max_memory), list(experts))
    limits = get_max_memory(max_memory)
    empty: dict = {}
    device_map = placement.plan(
        module_tree(model),
        sizes,
        limits,
        _no_split(no_split_module_classes),
        find_tied_parameters(model),
        match_accelerate=match_accelerate,
        clean=clean_result,
        verbose=verbose,
        fallback=fallback_allocation,
        report=empty,
    )
    if not offload_buffers:
        reserve = 1 if match_accelerate else placement.STAGING_SLOTS
        _warn_offloaded_buffers(model, device_map, sizes, limits, dtype, special_dtypes, reserve)
    if empty:
        logger.info(
            "Based on the current allocation process, no modules could be assigned to the following devices due to "
            "insufficient memory:\n%s\nConsider increasing the memory these devices may use to at least that, or "
            "passing fallback_allocation=True.",
            "\n".join(f"  - {device}: {size} bytes required" for device, size in empty.items()),
        )
    return device_map


def _warn_offloaded_buffers(model, device_map: dict, sizes: dict, limits: dict, dtype, special_dtypes, reserve: int) -> None:
    """accelerate's warning: the buffers of CPU/disk modules live on the main GPU at run time; say so when they do
    not fit there beside the map's modules and the room held for streaming (``reserve`` largest layers)."""
    main = main_device(device_map)
    offloaded = [k for k, d in device_map.items() if d in ("cpu", "disk")]
    if main.type != "cuda" or not offloaded:
        return  # on a CPU main device the buffers stay in host memory
    buffers = compute_module_sizes(model, dtype=dtype, special_dtypes=special_dtypes, buffers_only=True)
    needed = sum(buffers.get(k, 0) for k in offloaded)
    gpu = main.index or 0
    if needed == 0 or gpu not in limits:
        return
    used = sum(sizes.get(k, 0) for k, d in device_map.items() if torch_device(d) == main)
    used += reserve * placement.max_layer_size(list(module_tree(model).children), sizes, set())[0]
    if limits[gpu] < needed + used:
        warnings.warn(
            f"Current model requires {needed} bytes of buffer for offloaded layers, which seems does not fit any "
            "GPU's remaining memory. If you are experiencing a OOM later, please consider using offload_buffers=True.",
            UserWarning,
            stacklevel=3,
        )


def resolve_device_map(
    model, device_map, max_memory=None, no_split_module_classes=None, dtype=None, offload_buffers=False
) -> dict | None:
    """A device map from a string (``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"``) or as given."""
    if not isinstance(device_map, str):
        return None if device_map is None else dict(device_map)
    if device_map not in DEVICE_MAP_STRINGS:
        raise UsageError(f"unknown device_map {device_map!r}: use a dict or one of {', '.join(DEVICE_MAP_STRINGS)}")
    if device_map != "sequential":
        max_memory = get_balanced_memory(
            model, max_memory, no_split_module_classes, dtype, low_zero=device_map == "balanced_low_0"
        )
    return infer_auto_device_map(model, max_memory, no_split_module_classes, dtype, offload_buffers=offload_buffers)


def gpu_count() -> int:
    """How many CUDA GPUs this process can use (0 with a CPU-only torch); never creates a CUDA context."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _no_gpu_reason(count: int) -> str:
    import torch

    if count:
        return f"this machine has {count} GPU{'s' if count > 1 else ''} (0 to {count - 1})"
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    return "this machine has no CUDA GPU"


def present_max_memory(max_memory: dict) -> dict:
    """``max_memory`` (normalized) without the GPUs this machine lacks, each dropped with a warning.

    accelerate only logs that such a device "is not available" and then fails when it moves weights there
    (``Torch not compiled with CUDA enabled``); the README's ``{0: "20GiB", "cpu": "64GiB"}`` on a laptop
    should load on the CPU and disk instead.
    """
    budget = placement.normalize_max_memory(max_memory)
    gpus = [d for d in budget if isinstance(d, int)]
    if not gpus:
        return budget
    count = gpu_count()
    absent = [d for d in gpus if d >= count]
    if absent:
        names = ", ".join(f"GPU {d}" for d in absent)
        warnings.warn(
            f"max_memory names {names}, but {_no_gpu_reason(count)}: planning without {'it' if len(absent) == 1 else 'them'}",
            stacklevel=3,
        )
    return {d: v for d, v in budget.items() if d not in absent}


def check_devices_present(device_map: dict) -> None:
    """Raise :class:`UsageError` (one line) when ``device_map`` puts something on a GPU this machine lacks.

    Asks CUDA nothing when the map names no GPU, so CPU and disk maps never initialise it.
    """
    wanted: dict[int, str] = {}
    for key, device in device_map.items():
        index = _gpu_index(device)
        if index is not None:
            wanted.setdefault(index, key)
    if not wanted:
        return
    for index, key in sorted(wanted.items()):
        require_gpu(index, f"device_map puts {repr(key) if key else 'the whole model'}")


def require_gpu(index: int, subject: str) -> None:
    """Raise :class:`UsageError` ``"{subject} on GPU {index}, but ..."`` unless this machine has that GPU."""
    count = gpu_count()
    if index >= count:
        raise UsageError(f"{subject} on GPU {index}, but {_no_gpu_reason(count)}: use an existing GPU, 'cpu' or 'disk'")


def _gpu_index(device) -> int | None:
    """The CUDA index a device-map value names (``0``, ``"cuda"``, ``"cuda:1"``, ``torch.device``), else None."""
    if isinstance(device, bool):
        return None
    if isinstance(device, int):
        return device
    text = str(device)
    if text == "cuda":
        return 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    return None


def device_for(name: str, device_map: dict):
    """The device ``device_map`` gives tensor or module ``name``: the entry of its longest covering key, or None."""
    key = covering_key(name, device_map)
    return None if key is None else device_map[key]


def check_device_map(model, device_map: dict) -> None:
    """Raise :class:`UsageError` (a ``ValueError``) when ``device_map`` leaves a tensor without a device or gives a
    device that is not one; warn (``UserWarning``, as accelerate does) about keys that name nothing in ``model``."""
    modules = dict(model.named_modules())
    tensors = [*dict(model.named_parameters(remove_duplicate=False)), *dict(model.named_buffers(remove_duplicate=False))]
    known = set(modules) | set(tensors)
    unknown = [k for k in device_map if k not in known]
    if unknown:
        warnings.warn(
            f"The following device_map keys do not match any submodules in the model: {unknown}", UserWarning, stacklevel=3
        )
    for key, device in device_map.items():
        _check_device(key, device)
    uncovered = [n for n in tensors if device_for(n, device_map) is None]
    if uncovered:
        more = f" and {len(uncovered) - 5} more" if len(uncovered) > 5 else ""
        raise UsageError(
            f"device_map does not give any device for the following parameters: {', '.join(map(repr, uncovered[:5]))}{more}"
        )


def _check_device(key: str, device) -> None:
    import torch

    if isinstance(device, torch.device) or (isinstance(device, int) and not isinstance(device, bool)):
        return
    if isinstance(device, str) and (device in ("cpu", "disk", "meta") or device.startswith("cuda")):
        return
    raise UsageError(f"device_map gives {key!r} the device {device!r}: use a GPU index, 'cuda:N', 'cpu' or 'disk'")


def covering_key(name: str, device_map: dict) -> str | None:
    """The longest key of ``device_map`` that covers ``name`` (the block ``name`` belongs to), or None."""
    probe = name
    while True:
        if probe in device_map:
            return probe
        if not probe:
            return None
        probe = probe.rsplit(".", 1)[0] if "." in probe else ""


def block_module(key: str, tensor: str, modules: dict) -> str:
    """The module whose forward runs the block of ``key`` that holds ``tensor``: the key itself (the owner of a
    tensor key), or, for containers that are never called (``ModuleList``, ``ModuleDict``), the child on the path to
    ``tensor``, so a key like ``model.layers`` becomes one block per layer."""
    from torch import nn

    name = key if key in modules else (key.rsplit(".", 1)[0] if "." in key else "")
    while type(modules[name]).forward is nn.Module.forward:
        rest = tensor[len(name) + 1 :] if name else tensor
        child = f"{name}.{rest.split('.', 1)[0]}" if name else rest.split(".", 1)[0]
        if child not in modules:
            break
        name = child
    return name


def streaming_map(model, device_map: dict, main) -> dict:
    """``device_map`` as the dispatcher streams it: every offloaded entry (``"disk"``, and ``"cpu"`` when ``main``
    is a GPU) that spans repeated layers becomes one entry per layer (or no-split module), whatever the map's
    granularity, so ``{"": "disk"}`` holds one layer at a time, not the model (see
    :func:`~shardkit.bigmodel.placement.expand_offloaded`)."""

    def offloaded(device) -> bool:
        device = torch_device(device)
        return device == "disk" or (device.type == "cpu" and main.type != "cpu")

    if not any(offloaded(d) for d in device_map.values()):
        return device_map
    root = module_tree(model)
    spanning = placement.spanning_modules(root, _no_split(getattr(model, "_no_split_modules", None)))
    return placement.expand_offloaded(device_map, root, spanning, offloaded)


def main_device(device_map: dict | None):
    """Where offloaded blocks run: the first GPU the map uses, else the CPU (accelerate's choice)."""
    import torch

    for device in (device_map or {}).values():
        if device not in ("cpu", "disk", "meta"):
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    return torch.device("cpu")


def torch_device(device):
    """A map's device value as ``torch.device`` (``"disk"`` stays the string)."""
    import torch

    if device == "disk":
        return device
    return torch.device(f"cuda:{device}" if isinstance(device, int) and not isinstance(device, bool) else device)
