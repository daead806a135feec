"""Routed fetch for mixture-of-experts blocks: stage only the experts the router chose.

transformers 5 gives every MoE architecture one experts interface: a module holding packed 3-D parameters
(``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``, optional per-expert biases) whose
``forward(hidden_states, top_k_index, top_k_weights)`` receives the router's choice before it touches a weight.
Expert ``e`` of every such tensor is the contiguous slice ``[e]``, in host memory and in a safetensors file alike.

So when an offloaded block is such a module, its hook does not copy the block: it reads the chosen expert ids
(one small device-to-host synchronization per layer), copies only those experts' slices into the front of a
staging slab as compact ``[n, ...]`` tensors (expert ids ascending), remaps ``top_k_index`` onto ``0..n-1``
(the "no expert" sentinel ``E`` becomes ``n``) and runs the module's own forward with ``num_experts = n``.
The kernels are the model's own, on the same rows in the same order, so the output is bitwise the dense one.

An optional :class:`ExpertCache` on the execution device keeps recently used experts (least recently used out):
a hit is a device-local copy instead of a host-to-device one. When the experts to fetch would cost about as many
bytes as the whole block (long prefills route to most experts), the block is staged whole as before.

Lifecycle, per forward of a routed block (see :func:`routed_forward`): read ids → choose routed or dense by
bytes → stage (cache hits, host or disk reads for misses, misses copied into the cache) → install the compact
views → run → reinstall the tensors at rest and release the slab.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from . import slab
from .measure import is_experts_module
from .readahead import split_pieces
from .transfer import move

logger = logging.getLogger(__name__)

#: Routed staging is used while the bytes it must move stay below this share of the whole block's bytes:
#: past it one coalesced copy of the block is as cheap and needs no index remapping.
DENSE_SHARE = 0.9


@dataclass
class ExpertLayout:
    """How a block's tensors split per expert: ``count`` experts, ``per_expert[name]`` bytes of tensor ``name``."""

    count: int
    per_expert: dict[str, int]
    stats: dict[str, int] = field(default_factory=lambda: {"forwards": 0, "routed": 0, "dense": 0, "experts": 0})

    @property
    def expert_bytes(self) -> int:
        """Bytes one expert takes in a compact slab (every tensor aligned as in :func:`slab.layout`)."""
        return sum(_aligned(n) for n in self.per_expert.values())


def _aligned(nbytes: int) -> int:
    return -(-nbytes // slab.ALIGN) * slab.ALIGN


def layout_for(block) -> ExpertLayout | None:
    """The per-expert layout of ``block`` if routed fetch can run it, else None (dense streaming).

    Routed fetch needs the transformers 5 interface: an integer ``num_experts``, a forward taking
    ``(hidden_states, top_k_index, top_k_weights)``, and every streamed tensor of the block indexed by expert on
    its first dimension. A module that holds 3-D expert weights without that interface logs one info line.
    """
    module = block.module
    if not is_experts_module(module):
        return None
    count = getattr(module, "num_experts", None)
    shapes_ok = bool(block.slots) and all(s.shape and s.shape[0] == count for s in block.slots.values())
    if not isinstance(count, int) or count < 1 or not shapes_ok or not _takes_routing(module):
        logger.info(
            "shardkit: %s (%s) holds expert weights but not the transformers 5 experts interface; it is streamed whole (dense)",
            block.name or "(root)",
            type(module).__name__,
        )
        return None
    return ExpertLayout(count, {name: s.nbytes // count for name, s in block.slots.items()})


def _takes_routing(module) -> bool:
    import inspect

    forward = type(module).forward
    target = getattr(forward, "__wrapped__", forward)  # transformers' use_experts_implementation wraps it
    try:
        params = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return False
    return params[1:4] == ["hidden_states", "top_k_index", "top_k_weights"]


class ExpertCache:
    """Recently used experts kept on the execution device, least recently used evicted first.

    One pool of ``capacity`` equal slots (the largest expert of any routed block), keyed by (block, expert).
    Every copy in or out of the pool runs on the streamer's copy stream, so stream order keeps a slot's old
    contents readable until the copies that read them have run.
    """

    def __init__(self, device: torch.device, budget: int, slot_bytes: int) -> None:
        self.slot_bytes = max(slot_bytes, 1)
        self.capacity = max(budget // self.slot_bytes, 0)
        self.pool = slab.allocate(self.capacity * self.slot_bytes, device) if self.capacity else None
        self.entries: OrderedDict[tuple[str, int], int] = OrderedDict()
        self.free = list(range(self.capacity))
        self.hits = 0
        self.misses = 0

    def find(self, key: tuple[str, int]) -> int | None:
        index = self.entries.get(key)
        if index is not None:
            self.entries.move_to_end(key)
        return index

    def claim(self, key: tuple[str, int], keep: set) -> int | None:
        """A slot for ``key``, evicting the least recently used entry not in ``keep``; None if all are kept."""
        if self.free:
            index = self.free.pop()
        else:
            victim = next((k for k in self.entries if k not in keep), None)
            if victim is None:
                return None
            index = self.entries.pop(victim)
        self.entries[key] = index
        return index

    def view(self, index: int):
        return self.pool[index * self.slot_bytes : (index + 1) * self.slot_bytes]

    def stats(self) -> dict:
        total = self.hits + self.misses
        return {
            "capacity": self.capacity,
            "cached": len(self.entries),
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / total if total else 0.0,
            "bytes": self.capacity * self.slot_bytes,
        }


def _routing(args, kwargs):
    """(hidden_states, top_k_index) from an experts forward call, positional or keyword."""
    hidden = args[0] if args else kwargs["hidden_states"]
    index = args[1] if len(args) > 1 else kwargs["top_k_index"]
    return hidden, index


def _with_index(args, kwargs, index):
    if len(args) > 1:
        return (args[0], index, *args[2:]), kwargs
    return args, {**kwargs, "top_k_index": index}


def routed_forward(hook, args, kwargs):
    """Run ``hook``'s routed experts block on the experts its inputs select (see the module docstring)."""
    block, streamer = hook.block, hook.streamer
    layout: ExpertLayout = block.experts
    if hook.device is not None:
        args, kwargs = move(args, hook.device), move(kwargs, hook.device, hook.skip)
    _, index = _routing(args, kwargs)
    chosen = [e for e in torch.unique(index).tolist() if 0 <= e < layout.count]  # the one host sync per layer
    layout.stats["forwards"] += 1
    cache = streamer.expert_cache
    fetched = [e for e in chosen if cache is None or (block.name, e) not in cache.entries]
    if len(fetched) * layout.expert_bytes > DENSE_SHARE * block.nbytes:
        layout.stats["dense"] += 1
        return hook.run_staged(args, kwargs)
    layout.stats["routed"] += 1
    layout.stats["experts"] += len(chosen)
    slot, tensors = stage_experts(streamer, block, chosen)
    remap = torch.full((layout.count + 1,), len(chosen), dtype=index.dtype, device=index.device)
    if chosen:
        remap[torch.tensor(chosen, device=index.device)] = torch.arange(len(chosen), dtype=index.dtype, device=index.device)
    args, kwargs = _with_index(args, kwargs, remap[index.clamp(0, layout.count)])
    module = block.module
    block.install(tensors)
    module.num_experts = len(chosen)
    try:
        return hook.call(args, kwargs)
    finally:
        module.num_experts = layout.count
        block.install(block.rest)
        streamer.release(block, slot)


def compact_layout(block, n: int) -> dict[str, tuple[int, int]]:
    """``{tensor: (offset in the slab, bytes per expert)}`` for ``n`` experts laid out back to back."""
    out, position = {}, 0
    for name, per in block.experts.per_expert.items():
        out[name] = (position, per)
        position += _aligned(per * n)
    return out


def stage_experts(streamer, block, chosen: list[int]):
    """Copy experts ``chosen`` (ascending) of ``block`` into the next staging slab; returns the slot and the
    compact tensors to install, in ``block.places`` order."""
    if streamer.last is not None and streamer.last is not block:
        streamer.next[streamer.last] = block
    streamer.last = block
    slot = streamer.routed_slot()
    streamer._wait_pending(slot)
    streamer.owner[slot] = None  # a selection of experts, not the block: never reused as the staged block
    target = streamer.slabs[slot]
    places = compact_layout(block, len(chosen))
    cache: ExpertCache | None = streamer.expert_cache
    layout: ExpertLayout = block.experts

    hits, misses = [], []
    for i, e in enumerate(chosen):
        found = cache.find((block.name, e)) if cache is not None else None
        (hits if found is not None else misses).append((i, e, found))
    if cache is not None:
        cache.hits += len(hits)
        cache.misses += len(misses)
        keep = {(block.name, e) for e in chosen}
        misses = [(i, e, cache.claim((block.name, e), keep)) for i, e, _ in misses]

    def runs_of(items):
        """Consecutive experts (in the source and in the compact slab alike) merged into one copy."""
        merged: list[list[int]] = []
        for i, e, _ in items:
            if merged and merged[-1][0] + merged[-1][2] == i and merged[-1][1] + merged[-1][2] == e:
                merged[-1][2] += 1
            else:
                merged.append([i, e, 1])
        return merged

    def cache_part(index: int, name: str):
        at = 0
        for other, per in layout.per_expert.items():
            if other == name:
                return cache.view(index)[at : at + per]
            at += _aligned(per)
        raise KeyError(name)

    def enqueue(host_copy) -> None:
        host_copy()  # first: a disk read through the ring may overwrite the slab between the misses
        for i, _e, found in hits:
            for name, (offset, per) in places.items():
                target[offset + i * per : offset + (i + 1) * per].copy_(cache_part(found, name), non_blocking=True)
        for i, _e, index in misses:
            if cache is not None and index is not None:
                for name, (offset, per) in places.items():
                    cache_part(index, name).copy_(target[offset + i * per : offset + (i + 1) * per], non_blocking=True)

    if block.tier == "disk":
        host_copy = _disk_read(streamer, block, runs_of(misses), places, target)
    else:

        def host_copy() -> None:
            for i, e, count in runs_of(misses):
                for name, (offset, per) in places.items():
                    src = block.slots[name].offset + e * per
                    target[offset + i * per : offset + (i + count) * per].copy_(
                        block.host[src : src + count * per], non_blocking=True
                    )

    if streamer.cuda:
        with torch.cuda.stream(streamer.copy_stream):
            streamer.copy_stream.wait_event(streamer.free[slot])
            enqueue(host_copy)
            streamer.ready[slot].record(streamer.copy_stream)
    else:
        enqueue(host_copy)
    streamer._wait(slot)
    streamer.busy[slot] = True
    streamer.current = slot
    streamer.prefetch()
    n = len(chosen)
    tensors = []
    for _module, _attr, is_param, name in block.places:
        offset, per = places[name]
        shape = (n, *block.slots[name].shape[1:])
        view = target[offset : offset + n * per].view(block.slots[name].dtype).view(shape)
        tensors.append(torch.nn.Parameter(view, requires_grad=False) if is_param else view)
    return slot, tensors


def _disk_read(streamer, block, runs, places, target):
    """The callable that reads the missed experts' byte ranges from the offload store into ``target``.

    On a CPU execution device the reads land in ``target`` directly; with a GPU they pass through the streamer's
    fixed pinned disk ring (:meth:`~shardkit.bigmodel.hooks.Streamer.through_ring`), each piece copied on the copy
    stream once read, so host memory stays the ring's whatever the block's size.
    """
    store = block.store
    pieces = []  # (file, file offset, offset in the compact slab, nbytes)
    for i, e, count in runs:
        for name, (offset, per) in places.items():
            # packed from per-expert tensors, one expert's bytes may lie in several runs of the file
            for file, at_file, nbytes, within in store.tensors[name].locate(e * per, count * per):
                pieces.append((file, at_file, offset + i * per + within, nbytes))
    if not streamer.cuda:
        return lambda: streamer.read_runs(pieces, target, store)
    end = max((at + nbytes for _, _, at, nbytes in pieces), default=0)
    spans = split_pieces(pieces, end, streamer.pieces[0].numel())
    return lambda: streamer.through_ring(spans, target)
