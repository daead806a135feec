"""Put a loaded model on its devices and attach the hooks that run it: accelerate's big-model entry points."""

from __future__ import annotations

import os
import re
import types
from dataclasses import dataclass

import torch

from ..errors import CheckpointError, UsageError
from ..units import parse_size
from . import slab
from .devicemap import (
    block_module,
    check_device_map,
    check_devices_present,
    covering_key,
    present_max_memory,
    require_gpu,
    resolve_device_map,
    streaming_map,
    torch_device,
)
from .devicemap import (
    main_device as map_main_device,
)
from .experts import ExpertCache, layout_for
from .hooks import Block, Hook, OutOfMemoryError, Streamer
from .loader import load_checkpoint_in_model
from .offload import INDEX_NAME, OffloadStore, OffloadWriter, stamp
from .targets import Place, Target, model_tensors


@dataclass(frozen=True)
class DispatchOptions:
    """How :func:`dispatch_model` runs a model: its keyword arguments, resolved once and passed down together."""

    main_device: torch.device  # where offloaded blocks run
    offload_dir: str | None = None  # a folder an earlier load offloaded into, or where disk blocks are written now
    offload_buffers: bool = False  # stream the buffers of offloaded blocks too (default: they live on main_device)
    skip_keys: tuple[str, ...] = ()  # input keys a hook leaves where they are (a cache object, say)
    preload_module_classes: tuple[str, ...] = ()
    force_hooks: bool = False  # hooks even when the whole model sits on one device
    routed_experts: bool = True  # an offloaded experts module stages only the experts its router chose
    expert_cache: int = 0  # bytes of recently used experts kept on main_device

    @classmethod
    def resolve(
        cls,
        model,
        device_map: dict,
        main_device=None,
        offload_dir=None,
        offload_buffers: bool = False,
        skip_keys=None,
        preload_module_classes=None,
        force_hooks: bool = False,
        routed_experts: bool = True,
        expert_cache: int | str | None = None,
    ) -> DispatchOptions:
        """Defaults as accelerate's: the map's first GPU, else the CPU; the model's ``_skip_keys_device_placement``."""
        if main_device is None:
            main = map_main_device(device_map)
        else:
            main = torch.device(f"cuda:{main_device}" if isinstance(main_device, int) else main_device)
        if skip_keys is None:
            skip_keys = getattr(model, "_skip_keys_device_placement", None) or ()
        skip = (skip_keys,) if isinstance(skip_keys, str) else tuple(skip_keys)
        preload = (preload_module_classes,) if isinstance(preload_module_classes, str) else tuple(preload_module_classes or ())
        folder = os.fspath(offload_dir) if offload_dir is not None else None
        cache = parse_size(expert_cache) if isinstance(expert_cache, str) else int(expert_cache or 0)
        return cls(main, folder, offload_buffers, skip, preload, force_hooks, routed_experts, cache)


def dispatch_model(
    model,
    device_map: dict,
    main_device=None,
    state_dict: dict | None = None,
    offload_dir: str | os.PathLike | None = None,
    offload_index: dict | None = None,
    offload_buffers: bool = False,
    skip_keys=None,
    preload_module_classes=None,
    force_hooks: bool = False,
    routed_experts: bool = True,
    expert_cache: int | str | None = None,
):
    """Place ``model`` per ``device_map`` and attach one hook per placed block; returns the model.

    GPU blocks move there once. ``"cpu"`` blocks (when a GPU runs the model) stay in a pinned host slab and
    ``"disk"`` blocks in the offload store; both run on ``main_device`` (default: the map's first GPU) through
    two staging slabs, prefetched one block ahead. The top-level forward returns outputs on the device its
    inputs came from. ``state_dict`` supplies values for offloaded tensors; ``offload_dir`` names a folder an
    earlier load offloaded into (or where weights of disk blocks are written now, if the model holds them);
    ``offload_index`` is an :class:`~shardkit.bigmodel.offload.OffloadStore`.

    A block is staged whole before its module's forward runs, so a module whose forward reads a child's weights
    without calling the child works whenever it is the block's module. ``preload_module_classes`` (class names,
    as in accelerate) makes every module of those classes one block with all its submodules, whatever the map's
    keys inside it, for such modules below the map's granularity.

    Mixture of experts: an offloaded block that is a transformers 5 experts module stages only the experts its
    router chose (``routed_experts=False`` stages it whole); ``expert_cache`` (bytes, or a size such as
    ``"8GB"``) keeps recently used experts on the execution device (see :mod:`shardkit.bigmodel.experts`).
    """
    check_device_map(model, device_map)
    check_devices_present(device_map)
    _detach_all(model)  # weights stay at rest: a disk-tier tensor keeps its place in the store for this dispatch
    model.hf_device_map = dict(device_map)
    options = DispatchOptions.resolve(
        model,
        device_map,
        main_device,
        offload_dir,
        offload_buffers,
        skip_keys,
        preload_module_classes,
        force_hooks,
        routed_experts,
        expert_cache,
    )
    if options.main_device.type == "cuda":
        require_gpu(options.main_device.index or 0, "main_device runs the offloaded blocks")
    devices = {torch_device(d) for d in device_map.values()}
    if len(devices) == 1 and "disk" not in devices and not options.force_hooks:
        model.to(next(iter(devices)))
        return model
    store = offload_index if offload_index is not None else getattr(model, "_shardkit_offload", None)
    if store is None and offload_dir is not None and os.path.isfile(os.path.join(offload_dir, INDEX_NAME)):
        store = OffloadStore.open(offload_dir)
    modules = dict(model.named_modules())
    blocks_map = streaming_map(model, device_map, options.main_device)
    groups = _group_by_block(model, blocks_map, modules, options.preload_module_classes)
    blocks, store = _build_blocks(groups, modules, options, store, state_dict, getattr(model, "_shardkit_host", None) or {})
    offloaded = [b for b in blocks if b.tier != "resident"]
    if options.routed_experts:
        for block in offloaded:
            block.experts = layout_for(block)
    streamer = _streamer(options.main_device, offloaded, store, options.expert_cache) if offloaded else None
    for block in blocks:
        hook = Hook(block.module, block.device, block, streamer, block.name == "", options.skip_keys, options.offload_buffers)
        hook.attach()
    if "" not in groups:
        Hook(model, None, streamer=streamer, io_same_device=True, main=options.main_device).attach()
    model._shardkit_streamer = streamer
    model._shardkit_offload = store
    if offloaded:
        _guard_moves(model)
    return model


_MOVES = ("to", "cuda")


def _guard_moves(model) -> None:
    """Refuse ``model.to(...)`` / ``model.cuda()`` while offloaded blocks are hooked, as accelerate does: moving
    would copy the at-rest tensors (host slabs, meta) and leave the hooks staging over them. Bound methods, so a
    deep copy of the model checks its own blocks."""
    for attr in _MOVES:
        method = getattr(type(model), attr)

        def guarded(self, *args, _method=method, **kwargs):
            if any(m.__dict__.get("_shardkit_hook") is not None and m._shardkit_hook.offload for m in self.modules()):
                raise RuntimeError(
                    "You can't move a model that has some modules offloaded to cpu or disk: its offloaded blocks "
                    "already run on the execution device; call shardkit.remove_hooks(model) first to move it"
                )
            return _method(self, *args, **kwargs)

        model.__dict__[attr] = types.MethodType(guarded, model)


def _unguard_moves(model) -> None:
    for attr in _MOVES:
        model.__dict__.pop(attr, None)


def _streamer(main: torch.device, offloaded: list[Block], store, expert_cache: int) -> Streamer:
    """The streamer for ``offloaded`` blocks, with an expert cache when asked and some block is routed.

    Its staging slabs (and the cache) are allocated here, once: a GPU without room for them is a clear error
    naming the largest block, not an out-of-memory error in the first forward.
    """
    largest = max(offloaded, key=lambda b: b.nbytes)
    try:
        streamer = Streamer(main, offloaded, store)
    except torch.OutOfMemoryError as exc:
        raise OutOfMemoryError(
            f"out of memory on {main} allocating two staging slabs of {largest.nbytes:,} bytes for offloaded blocks "
            f"(the largest is {largest.name or '(root)'!r}): give {main} a smaller max_memory so the map leaves room"
        ) from exc
    routed = [b for b in offloaded if b.experts is not None]
    if routed and expert_cache:
        try:
            streamer.expert_cache = ExpertCache(main, expert_cache, max(b.experts.expert_bytes for b in routed))
        except torch.OutOfMemoryError as exc:
            streamer.close()
            raise OutOfMemoryError(
                f"out of memory on {main} allocating a {expert_cache:,}-byte expert cache beside the staging slabs of "
                f"{largest.name or '(root)'!r}: pass a smaller expert_cache"
            ) from exc
    return streamer


def _group_by_block(
    model, device_map: dict, modules: dict, preload: tuple[str, ...] = ()
) -> dict[str, tuple[object, list[Target]]]:
    """``{block module name: (device, targets)}``, blocks in module order: every tensor in the block whose hook will
    manage it. A tensor tied across blocks (embeddings and LM head) is given to each block that uses it. A module
    of a ``preload`` class takes over every block inside it."""
    groups: dict[str, tuple[object, list[Target]]] = {}
    preloaded = [n for n, m in modules.items() if type(m).__name__ in preload]

    def block_of(tensor_name: str) -> tuple[str, object]:
        key = covering_key(tensor_name, device_map)
        name = block_module(key, tensor_name, modules)
        name = next((p for p in preloaded if not p or name == p or name.startswith(p + ".")), name)
        return name, torch_device(device_map[key])

    for whole in model_tensors(model):
        token = object()  # what the parts of one tensor share, to keep them one tensor when hooks are removed
        for (name, device), target in whole.split(block_of).items():
            target.token = token
            previous = groups.get(name)
            if previous is not None and previous[0] != device:
                raise UsageError(
                    f"device_map puts tensors of module {name!r} on both {previous[0]} and {device}: give the module one device"
                )
            groups.setdefault(name, (device, []))[1].append(target)
    order = list(modules)
    return {name: groups[name] for name in sorted(groups, key=order.index)}


def _build_blocks(groups: dict, modules: dict, options: DispatchOptions, store, state_dict, host_slabs: dict):
    """One :class:`Block` per group: resident blocks settle on their device, offloaded ones are laid out in a slab
    (pinned host memory or the offload store). Returns the blocks and the offload store (created if disk blocks
    had to be written out)."""
    main = options.main_device
    names = list(groups)
    outer = {n for n in names if any(o != n and (not n or o.startswith(n + ".")) for o in names)}
    blocks = []
    for name in names:
        device, targets = groups[name]
        if device == "disk" or (device.type == "cpu" and main.type != "cpu"):
            tier = "disk" if device == "disk" else "cpu"
            exec_device = main
        else:
            tier, exec_device = "resident", device
        if name in outer and tier != "resident":
            tier = "resident"  # a module whose children are blocks of their own: its few direct tensors stay on the main device
        block = Block(name, modules[name], exec_device, tier)
        streamed = []
        for t in targets:
            is_buffer = not t.places[0][2]
            if tier == "resident" or (is_buffer and not options.offload_buffers):
                _settle(t, exec_device, store, state_dict)
            else:
                streamed.append(t)
        if streamed:
            _offload(block, streamed, host_slabs.get(name), store, state_dict, options.offload_dir, pin=main.type == "cuda")
            store = block.store if block.tier == "disk" else store
        else:
            block.tier = "resident"
        blocks.append(block)
    return blocks, store


def _value(t: Target, store, state_dict):
    """The tensor's value on the CPU or wherever it is: the model's, the state dict's, or the offload store's."""
    name = t.names[0]
    if state_dict is not None:
        for n in t.names:
            if n in state_dict:
                return state_dict[n]
    if t.old.device.type != "meta":
        return t.old
    if store is not None:
        for n in t.names:
            if n in store.tensors:
                return store.load(n)
    raise CheckpointError(
        name, "has no value (still on the meta device): load the checkpoint before dispatching", code="missing-keys"
    )


def _set(t: Target, value) -> None:
    is_param = t.places[0][2]
    if is_param:
        value = torch.nn.Parameter(value, requires_grad=False)
    for module, attr, param, _ in t.places:
        (module._parameters if param else module._buffers)[attr] = value


def _settle(t: Target, device, store, state_dict) -> None:
    """Make a resident tensor live on ``device``."""
    value = _value(t, store, state_dict)
    if value.device != device:
        value = value.to(device)
    if value is not t.old:
        _set(t, value.data if isinstance(value, torch.nn.Parameter) else value)


def _offload(block: Block, targets: list[Target], loaded, store, state_dict, offload_dir, pin: bool) -> None:
    """Lay ``block``'s streamed tensors out in a slab: in pinned host memory (cpu tier) or the offload store (disk)."""
    specs = []
    for t in targets:
        source = t.old if t.old.device.type != "meta" or store is None or t.names[0] not in store.tensors else None
        dtype = source.dtype if source is not None else _store_dtype(store, t.names[0])
        specs.append((t.names[0], dtype, tuple(t.old.shape)))
    block.slots, block.nbytes = slab.layout(specs)
    block.places = [Place(m, a, p, t.names[0]) for t in targets for (m, a, p, _) in t.places]
    block.ties = [getattr(t, "token", None) or t for t in targets for _ in t.places]
    if block.tier == "cpu":
        if loaded is not None and _same_layout(loaded[1], block.slots):
            block.host = loaded[0]  # the loader already read these weights into a pinned slab of this layout
        else:
            block.host = slab.allocate(block.nbytes, pin=pin)
            for t in targets:
                slab.view(block.host, block.slots[t.names[0]]).copy_(_value(t, store, state_dict))
                _set(t, slab.view(block.host, block.slots[t.names[0]]))  # free the original as we go
        block.rest = [_rest(slab.view(block.host, block.slots[name]), p) for (_, _, p, name) in block.places]
    else:
        missing = [t for t in targets if store is None or t.names[0] not in store.tensors]
        if missing:
            store = _write_disk(block, missing, store, state_dict, offload_dir)
        block.runs = store.runs({name: s.offset for name, s in block.slots.items()})
        block.rest = [
            _rest(torch.empty(s.shape, dtype=s.dtype, device="meta"), p)
            for (_, _, p, name) in block.places
            for s in [block.slots[name]]
        ]
    block.store = store
    block.install(block.rest)


def _rest(tensor, is_param):
    return torch.nn.Parameter(tensor, requires_grad=False) if is_param else tensor


def _store_dtype(store, name):
    from ..dtypes import torch_dtype

    return torch_dtype(store.tensors[name].dtype)


def _same_layout(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] for k in a)


def _write_disk(block: Block, targets: list[Target], store, state_dict, offload_dir) -> OffloadStore:
    """Write disk-mapped weights the model holds in memory into ``offload_dir`` (disk_offload of a loaded model)."""
    from ..dtypes import from_torch_dtype

    if offload_dir is None:
        raise UsageError(
            f"the device map puts {block.name or 'the model'!r} on disk: pass offload_dir (a folder for its weights)"
        )
    os.makedirs(offload_dir, exist_ok=True)
    values = [(t, _value(t, None, state_dict).contiguous()) for t in targets]
    path = os.path.join(os.fspath(offload_dir), re.sub(r"[^A-Za-z0-9_.-]", "_", block.name or "model") + ".safetensors")
    writer = OffloadWriter(
        path, [(t.names[0], from_torch_dtype(v.dtype), tuple(v.shape), v.numel() * v.element_size()) for t, v in values]
    )
    try:
        for t, v in values:
            if v.numel():
                writer.write_at(t.names[0], 0, slab.as_bytes(v.cpu()).numpy())
        stored = writer.finish()
    except BaseException:
        writer.abort()
        raise
    if store is None:
        store = OffloadStore({}, {}, os.fspath(offload_dir))
    store.tensors.update(stored)
    store.stamps[path] = stamp(path)
    store.save()
    return store


def remove_hook_from_module(module, recurse: bool = False):
    """Detach shardkit's hook from ``module`` (and its submodules with ``recurse``), as accelerate does: the module
    runs its own forward again, with its weights where they rest: CPU-tier ones in host memory, disk-tier ones
    read back from the offload store onto the CPU (tied weights stay tied). GPU blocks stay on their GPU."""
    targets = list(module.modules()) if recurse else [module]
    loaded: dict = {}
    for m in targets:
        hook = m.__dict__.get("_shardkit_hook")
        if hook is not None:
            hook.detach()
            hook.restore(loaded)
    if recurse:
        streamer = module.__dict__.get("_shardkit_streamer")
        if streamer is not None:
            streamer.close()
            module._shardkit_streamer = None
        _unguard_moves(module)
    return module


def _detach_all(model) -> None:
    for m in model.modules():
        hook = m.__dict__.get("_shardkit_hook")
        if hook is not None:
            hook.detach()
    streamer = model.__dict__.get("_shardkit_streamer")
    if streamer is not None:
        streamer.close()
        model._shardkit_streamer = None
    _unguard_moves(model)


def remove_hooks(model) -> None:
    """Detach every shardkit hook from ``model`` and stop its streamer (see :func:`remove_hook_from_module`)."""
    remove_hook_from_module(model, recurse=True)


def load_checkpoint_and_dispatch(
    model,
    checkpoint,
    device_map=None,
    max_memory: dict | None = None,
    no_split_module_classes=None,
    offload_folder=None,
    offload_buffers: bool = False,
    dtype=None,
    offload_state_dict=None,
    skip_keys=None,
    preload_module_classes=None,
    force_hooks: bool = False,
    strict: bool = False,
    full_state_dict: bool = True,
    broadcast_from_rank0: bool = False,
    routed_experts: bool = True,
    expert_cache: int | str | None = None,
    progress: bool | None = None,
):
    """Plan (for a string ``device_map``), stream the checkpoint in, and dispatch: accelerate's one-call workflow.

    ``device_map=None`` (the default, as in accelerate) loads without dispatching: tensors go where the model's
    already are, meta ones to the CPU. ``offload_state_dict`` is accepted and has nothing to do: the load streams
    tensor by tensor, so no state dict is ever held. ``full_state_dict`` and ``broadcast_from_rank0`` are checked
    by :func:`load_checkpoint_in_model`, as is ``progress`` (the loading bar). Returns the model.
    """
    if no_split_module_classes is None:
        no_split_module_classes = getattr(model, "_no_split_modules", None)
    if isinstance(device_map, str) and max_memory is not None:
        max_memory = present_max_memory(max_memory)  # a load on this machine: plan without GPUs it lacks
    device_map = resolve_device_map(model, device_map, max_memory, no_split_module_classes, dtype, offload_buffers)
    load_checkpoint_in_model(
        model,
        checkpoint,
        device_map=device_map,
        offload_folder=offload_folder,
        dtype=dtype,
        offload_buffers=offload_buffers,
        strict=strict,
        full_state_dict=full_state_dict,
        broadcast_from_rank0=broadcast_from_rank0,
        progress=progress,
    )
    if device_map is None:
        return model
    return dispatch_model(
        model,
        device_map,
        offload_dir=offload_folder,
        offload_buffers=offload_buffers,
        skip_keys=skip_keys,
        preload_module_classes=preload_module_classes,
        force_hooks=force_hooks,
        routed_experts=routed_experts,
        expert_cache=expert_cache,
    )


def offload_blocks(model, no_split_module_classes=None) -> list[str]:
    """Blocks for whole-model offload (the keys of ``cpu_offload``'s and ``disk_offload``'s maps).

    A block is a module without children, a module of a no-split class (``no_split_module_classes`` and the
    model's ``_no_split_modules``), or a module with a forward of its own below which only containers and
    childless modules sit (an attention or MLP with its projections): its forward may read its children's
    weights directly, and staging it whole makes that work without ``preload_module_classes``. Direct tensors
    of other modules are blocks of their own; the root is never one block.
    """
    from torch import nn

    no_split = set(no_split_module_classes or ()) | set(getattr(model, "_no_split_modules", None) or ())
    keys = []

    def runs_itself(module) -> bool:
        return type(module).forward is not nn.Module.forward and not isinstance(module, nn.Sequential)

    def over_leaves(module) -> bool:
        return all(not runs_itself(m) or not any(True for _ in m.children()) for m in list(module.modules())[1:])

    def walk(prefix, module):
        children = list(module.named_children())
        if not children or type(module).__name__ in no_split or (prefix and runs_itself(module) and over_leaves(module)):
            keys.append(prefix)
            return
        dot = f"{prefix}." if prefix else ""
        keys.extend(dot + n for n, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)])
        for n, child in children:
            walk(dot + n, child)

    walk("", model)
    return keys


def _default_execution_device(model):
    """accelerate's rule: where the model's first parameter is (the CPU for a model on meta or without any)."""
    first = next(iter(model.parameters()), None)
    if first is None or first.device.type == "meta":
        return torch.device("cpu")
    return first.device


def cpu_offload(model, execution_device=None, offload_buffers: bool = False, state_dict=None, preload_module_classes=None):
    """Keep every weight in host memory and stream it block by block to ``execution_device`` (default: the device
    of the model's first parameter, as in accelerate). With a GPU execution device the host copies are pinned."""
    device = torch.device(execution_device) if execution_device is not None else _default_execution_device(model)
    device_map = {k: "cpu" for k in offload_blocks(model, preload_module_classes)}
    return dispatch_model(
        model,
        device_map,
        main_device=device,
        state_dict=state_dict,
        offload_buffers=offload_buffers,
        preload_module_classes=preload_module_classes,
        force_hooks=True,
    )


def disk_offload(model, offload_dir, execution_device=None, offload_buffers: bool = False, preload_module_classes=None):
    """Write the model's weights once into ``offload_dir`` (or reuse what a load put there) and stream them from disk
    to ``execution_device`` (default: the device of the model's first parameter, as in accelerate)."""
    if offload_dir is None:
        raise UsageError("disk_offload needs an offload_dir")
    device = torch.device(execution_device) if execution_device is not None else _default_execution_device(model)
    device_map = {k: "disk" for k in offload_blocks(model, preload_module_classes)}
    return dispatch_model(
        model,
        device_map,
        main_device=device,
        offload_dir=offload_dir,
        offload_buffers=offload_buffers,
        preload_module_classes=preload_module_classes,
        force_hooks=True,
    )
