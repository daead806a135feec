"""Run-time hooks: one per placed block, plus the streamer that stages offloaded blocks on the execution device.

A block's hook moves the inputs to the block's device; if the block is offloaded it first makes the block's
weights available there. The :class:`Streamer` keeps a ring of two staging slabs on the execution device; an
offloaded block is one (pinned) host slab with the same layout, so staging it is one coalesced copy, issued on
a side CUDA stream one block ahead of execution: the compute stream waits on the copy's event, the copy into a
slab waits on the event of the compute that last read that slab. Nothing blocks the host per layer, nothing is
copied back, no GPU memory is allocated or freed in the hot path. Disk blocks reach the GPU in pieces through a
fixed pinned ring (:func:`~shardkit.bigmodel.readahead.disk_ring`, 256 MiB at most): reader threads fill ring
pieces, each piece's copy into the slab is enqueued as soon as it is read, and a piece is refilled once its copy
has run. On a CPU execution device the same code runs synchronously with one slab, which disk blocks are read
straight into.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..errors import ShardkitError
from . import slab
from .experts import routed_forward
from .readahead import PARALLEL_PIECE, PARALLEL_THREADS, disk_ring, split_pieces
from .targets import Place
from .transfer import move

#: Where a block's weights live between forwards: on its device, in a pinned CPU slab, or on disk.
Tier = Literal["resident", "cpu", "disk"]


class OutOfMemoryError(ShardkitError, torch.OutOfMemoryError):
    """A block ran out of GPU memory during the forward; the model stays usable."""

    code = "gpu-oom"


@dataclass(eq=False)
class Block:
    """The tensors one hook manages: ``places`` are :class:`~shardkit.bigmodel.targets.Place` tuples."""

    name: str
    module: object
    device: torch.device  # where it runs
    tier: Tier
    places: list[Place] = field(default_factory=list)
    slots: dict = field(default_factory=dict)  # tensor name -> slab.Slot (offloaded tiers)
    nbytes: int = 0
    host: object = None  # cpu tier: uint8 host slab
    runs: list = field(default_factory=list)  # disk tier: (file, file offset, slab offset, nbytes)
    pieces: list = field(default_factory=list)  # disk tier run on a GPU: (slab offset, nbytes, reads) per ring piece
    rest: list = field(default_factory=list)  # tensors installed between forwards
    ties: list = field(default_factory=list)  # per place: a token shared by the places of one model tensor
    staged: list = field(default_factory=list)  # per ring slot: tensors installed during the forward
    experts: object = None  # experts.ExpertLayout when only the routed experts are staged (mixture of experts)
    store: object = None  # disk tier: the offload store (a Mapping of name -> tensor) its bytes are read from

    def install(self, tensors) -> None:
        for (module, attr, is_param, _), tensor in zip(self.places, tensors):
            (module._parameters if is_param else module._buffers)[attr] = tensor


class Streamer:
    """Stage offloaded blocks into a ring of slabs on ``device`` (two on a GPU, prefetching the next block in
    execution order; one on the CPU, which has nothing to overlap)."""

    RING = 2

    def __init__(self, device: torch.device, blocks: list[Block], store=None, ring: int | None = None) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.store = store
        self.blocks = blocks
        self.ring = ring if ring is not None else self.RING if self.cuda else 1
        size = max((b.nbytes for b in blocks), default=0)
        self.slabs = [slab.allocate(size, device) for _ in range(self.ring)]
        self.owner: list[Block | None] = [None] * self.ring
        self.busy = [False] * self.ring  # acquired and not yet released: its slab is being read by enqueued compute
        self.pending: list = [None] * self.ring
        # Until a forward shows the real order, blocks run in module order, and forwards repeat: after the last
        # block comes the first (so the next forward's first copies start while this one ends).
        self.next = {a: b for a, b in zip(blocks, blocks[1:] + blocks[:1]) if a is not b}
        self.last: Block | None = None
        self.current = self.ring - 1
        self.expert_cache = None  # experts.ExpertCache, when routed experts are cached on the execution device
        for block in blocks:
            block.staged = [
                [_wrap(slab.view(s, block.slots[name]), is_param) for (_, _, is_param, name) in block.places] for s in self.slabs
            ]
        disk = [b for b in blocks if b.tier == "disk"]
        self.readers = (
            concurrent.futures.ThreadPoolExecutor(PARALLEL_THREADS, thread_name_prefix="shardkit-read") if disk else None
        )
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.ready = [torch.cuda.Event() for _ in range(self.ring)]
            self.free = [torch.cuda.Event() for _ in range(self.ring)]
            if disk:
                piece, count = disk_ring(max(b.nbytes for b in disk))
                ring = slab.allocate(piece * count, pin=True)  # one registration for the whole ring
                self.pieces = [ring[i * piece : (i + 1) * piece] for i in range(count)]
                self.piece_free = [torch.cuda.Event() for _ in range(count)]
                self.piece_next = 0
                for block in disk:
                    block.pieces = split_pieces(block.runs, block.nbytes, piece)
                # the stage worker (prefetching whole blocks) and routed expert reads (the forward's thread) share
                # the ring; one at a time
                self.ring_lock = threading.Lock()
                self.worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shardkit-stage")

    def acquire(self, block: Block) -> int:
        """Make ``block``'s weights ready in a slab (as seen by the current stream) and prefetch the next block."""
        if self.last is not None and self.last is not block:
            self.next[self.last] = block  # learn the execution order as it happens
        self.last = block
        slot = next((i for i, b in enumerate(self.owner) if b is block), None)
        if slot is None:
            slot = (self.current + 1) % self.ring  # keep the block staged last; overwrite the other slab
            self._stage(block, slot)
        self._wait(slot)
        self.busy[slot] = True
        self.current = slot
        self.prefetch()
        return slot

    def release(self, block: Block, slot: int) -> None:
        """The compute reading ``slot`` has been enqueued; the slab may be refilled once it has run."""
        self.busy[slot] = False
        if self.cuda:
            self.free[slot].record(torch.cuda.current_stream(self.device))

    def prefetch(self) -> None:
        """Stage the blocks due next (in the learned order) into slabs nobody is reading.

        Called when a block is acquired and when a resident block starts, so the first copies of a forward
        overlap the resident blocks that run before the offloaded ones instead of waiting for them.
        """
        due = self._due()
        for count, block in enumerate(due, 1):
            if block in self.owner or block.experts is not None:
                continue  # a routed experts block is staged only once its router has chosen
            # a slab may take ``block`` if nothing reads it and it holds no block due sooner (or ``block`` itself)
            idle = [i for i in range(self.ring) if not self.busy[i] and self.owner[i] not in due[:count]]
            if not idle:
                return
            self._stage(block, idle[0])

    def _due(self) -> list[Block]:
        """The blocks that run after the last one, in the learned order, as many as there are slabs."""
        due, block = [], self.last
        for _ in range(self.ring):
            block = self.next.get(block) if block is not None else None
            if block is None or block is self.last or block in due:
                break
            due.append(block)
        return due

    def routed_slot(self) -> int:
        """The slab a routed experts selection is staged into: one nobody reads, preferably one holding no block
        due next, so that a block prefetched while the router ran (the next layer's attention) stays staged."""
        order = [(self.current + k) % self.ring for k in range(1, self.ring + 1)]
        idle = [i for i in order if not self.busy[i]]
        due = self._due()
        spare = [i for i in idle if self.owner[i] not in due]
        return (spare or idle or order)[0]

    def _stage(self, block: Block, slot: int) -> None:
        self._wait_pending(slot)
        self.owner[slot] = block
        target = self.slabs[slot]
        if not self.cuda:
            if block.tier == "disk":
                self._read(block, target)
            else:
                target[: block.nbytes].copy_(block.host[: block.nbytes])
            return
        if block.tier == "disk":
            self.pending[slot] = self.worker.submit(self._disk_to_device, block, slot)
            return
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.free[slot])
            target[: block.nbytes].copy_(block.host[: block.nbytes], non_blocking=True)
            self.ready[slot].record(self.copy_stream)

    def _disk_to_device(self, block: Block, slot: int) -> None:
        """Worker thread: stream a disk block into ``slot`` through the pinned ring (see :meth:`through_ring`)."""
        self.copy_stream.wait_event(self.free[slot])  # the compute that last read this slab has run
        self.through_ring(block.pieces, self.slabs[slot])
        self.ready[slot].record(self.copy_stream)

    def through_ring(self, spans: list, target) -> None:
        """Read ``spans`` (from :func:`split_pieces`) into the pinned ring and copy each span into ``target`` on the
        copy stream as soon as it is read; a ring piece is refilled only once its last copy has run. A span is
        copied whole, so bytes of ``target`` between its reads are overwritten."""
        count = len(self.pieces)
        inflight: collections.deque = collections.deque()

        def copy_out(item) -> None:
            future, index, start, nbytes = item
            future.result()
            with torch.cuda.stream(self.copy_stream):
                target[start : start + nbytes].copy_(self.pieces[index][:nbytes], non_blocking=True)
                self.piece_free[index].record(self.copy_stream)

        with self.ring_lock:
            for start, nbytes, reads in spans:
                if len(inflight) == count:
                    copy_out(inflight.popleft())
                index, self.piece_next = self.piece_next, (self.piece_next + 1) % count
                self.piece_free[index].synchronize()  # the copy out of this piece has finished
                view = memoryview(self.pieces[index].numpy())
                inflight.append((self.readers.submit(self._read_piece, reads, view), index, start, nbytes))
            while inflight:
                copy_out(inflight.popleft())

    def _read_piece(self, reads: list, view: memoryview) -> None:
        for path, offset, at, nbytes in reads:
            self.store.read_into(path, offset, view[at : at + nbytes])

    def _read(self, block: Block, buffer) -> None:
        """Fill ``buffer`` with ``block``'s bytes from the offload store."""
        self.read_runs(block.runs, buffer, self.store)

    def read_runs(self, runs, buffer, store) -> None:
        """Fill ``buffer`` (a CPU uint8 tensor) with ``(file, file offset, buffer offset, nbytes)`` runs read from
        ``store``: pieces of :data:`PARALLEL_PIECE` bytes, on the reader threads when there are several."""
        view = memoryview(buffer.numpy())
        pieces = []
        for path, offset, at, nbytes in runs:
            for start in range(0, nbytes, PARALLEL_PIECE):
                size = min(PARALLEL_PIECE, nbytes - start)
                pieces.append((path, offset + start, view[at + start : at + start + size]))
        if self.readers is None or len(pieces) < 2:
            for piece in pieces:
                store.read_into(*piece)
        else:
            list(self.readers.map(lambda p: store.read_into(*p), pieces))

    def _wait_pending(self, slot: int) -> None:
        future, self.pending[slot] = self.pending[slot], None
        if future is not None:
            future.result()

    def _wait(self, slot: int) -> None:
        self._wait_pending(slot)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])

    def __deepcopy__(self, memo):
        """A copy of a dispatched model gets its own streamer (slabs, streams, threads) over the copied blocks.

        The copied blocks may still be half-built here (deepcopy reaches the streamer through their modules), so
        the new streamer is set up on first use.
        """
        import copy

        new = Streamer.__new__(Streamer)
        new.__dict__["_pending"] = (self.device, [copy.deepcopy(b, memo) for b in self.blocks], self.store)
        return new

    def __getattr__(self, name: str):
        pending = self.__dict__.pop("_pending", None)
        if pending is None:
            raise AttributeError(name)
        self.__init__(*pending)
        return getattr(self, name)

    def close(self) -> None:
        for i in range(self.ring):
            try:
                self._wait_pending(i)
            except Exception:
                pass
        for pool in (self.readers, getattr(self, "worker", None)):
            if pool is not None:
                pool.shutdown(wait=True)


def _wrap(tensor, is_param: bool):
    return torch.nn.Parameter(tensor, requires_grad=False) if is_param else tensor


def first_device(args, kwargs):
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
        if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
            return value[0].device
    return None


class BlockWeights(Mapping):
    """A hooked block's tensors by name relative to its module, as CPU tensors: what ``_hf_hook.weights_map`` is.

    transformers reads it to save an offloaded model (``load_offloaded_parameter``). Values come from the host
    slab (CPU tier), the offload store (disk tier, read on each access) or the module itself (resident).
    """

    def __init__(self, hook: Hook) -> None:
        self.hook = hook

    def _places(self) -> dict:
        block, prefix = self.hook.block, self.hook.prefix
        places = {}
        for index, (module, attr, _is_param, name) in enumerate(block.places if block is not None else []):
            relative = name[len(prefix) :] if prefix and name.startswith(prefix) else name
            places.setdefault(relative, (index, module, attr, name))
        return places

    def __getitem__(self, key: str):
        place = self._places().get(key)
        if place is None:
            raise KeyError(key)
        index, module, attr, name = place
        block = self.hook.block
        if block.tier == "cpu":
            return block.rest[index].data
        if block.tier == "disk":
            return block.store.load(name)
        tensor = module._parameters.get(attr)
        return (tensor if tensor is not None else module._buffers[attr]).data

    def __iter__(self):
        return iter(self._places())

    def __len__(self) -> int:
        return len(self._places())


class Hook:
    """Wraps one module's forward: stage its block (if offloaded), move inputs, and at the root move outputs back.

    Lifecycle: :meth:`attach` replaces the module's ``forward`` and exposes the hook as ``module._hf_hook`` (and
    ``_shardkit_hook``); each call runs :meth:`pre_forward` (stage the block, move the inputs), the original
    forward, and :meth:`post_forward` (put the block's at-rest tensors back, move outputs to the caller's device
    at the root); :meth:`detach_hook` undoes :meth:`attach` and leaves the block's weights on the CPU.

    The attributes transformers, PEFT and diffusers read on ``_hf_hook`` (``execution_device``, ``offload``,
    ``io_same_device``, ``offload_buffers``, ``weights_map``, ``original_devices``) mean what they mean on
    accelerate's ``AlignDevicesHook``; ``pre_forward(module)`` / ``post_forward(module, output)`` may be called
    alone to make a block's weights available around other work, as they do.
    """

    def __init__(
        self,
        module,
        device: torch.device | None,
        block: Block | None = None,
        streamer: Streamer | None = None,
        io_same_device: bool = False,
        skip_keys=(),
        offload_buffers: bool = False,
        main: torch.device | None = None,
    ) -> None:
        self.module = module
        self.device = device
        self.main = main  # where the model runs, for a hook that moves nothing (the root's)
        self.block = block
        self.streamer = streamer
        self.io_same_device = io_same_device
        self.skip = frozenset(skip_keys or ())
        self.offload_buffers = offload_buffers
        self.prefix = f"{block.name}." if block is not None and block.name else ""
        self.original = module.forward
        self.slots: list[int] = []  # staged slots, innermost last (pre_forward may be called around a forward)
        self.callers: list = []

    # -- what accelerate's AlignDevicesHook exposes --------------------------------------------------------------

    @property
    def execution_device(self) -> torch.device | None:
        return self.device if self.device is not None else self.main

    @execution_device.setter
    def execution_device(self, device) -> None:
        self.device = torch.device(device) if device is not None else None

    @property
    def offload(self) -> bool:
        return self.block is not None and self.block.tier != "resident"

    @property
    def weights_map(self) -> BlockWeights | None:
        return BlockWeights(self) if self.offload else None

    @property
    def original_devices(self) -> dict:
        """Where each of the block's tensors is at rest: ``cpu`` (CPU tier) or ``meta`` (disk tier)."""
        if not self.offload:
            return {}
        return {name: self.block.rest[index].device for name, (index, *_) in BlockWeights(self)._places().items()}

    def init_hook(self, module):
        return module

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def attach(self) -> None:
        self.module._shardkit_hook = self
        self.module._hf_hook = self
        self.module.forward = self.forward

    def detach(self) -> None:
        """Restore the module's own forward (the block's tensors stay as they are at rest)."""
        for attr in ("forward", "_old_forward"):
            self.module.__dict__.pop(attr, None)
        for attr in ("_shardkit_hook", "_hf_hook"):
            if self.module.__dict__.get(attr) is self:
                del self.module.__dict__[attr]

    def detach_hook(self, module):
        """accelerate's name: detach and put the block's weights back on the CPU (a disk block is read back).

        accelerate's ``remove_hook_from_module`` calls it and then deletes ``_hf_hook`` itself."""
        offloaded = self.offload
        for attr in ("forward", "_old_forward", "_shardkit_hook"):
            self.module.__dict__.pop(attr, None)
        self.restore()
        if offloaded and self.device is not None and self.device.type != "cpu":
            # buffers an offloaded block keeps on its execution device go back with its weights, as accelerate
            # puts every tensor back where it was: a model left half on the GPU would not run
            for sub in self.module.modules():
                for key, buffer in sub._buffers.items():
                    if buffer is not None and buffer.device.type not in ("cpu", "meta"):
                        sub._buffers[key] = buffer.cpu()
        return module

    def restore(self, loaded: dict | None = None) -> None:
        """Make the block's at-rest tensors real CPU tensors (disk-tier ones are read from the offload store);
        ``loaded`` shares values between blocks of one model, so tied weights stay tied."""
        block = self.block
        if block is None or block.tier != "disk":
            return
        loaded = {} if loaded is None else loaded
        values = []
        for index, (_, _, is_param, name) in enumerate(block.places):
            stored = block.store.tensors[name]
            key = block.ties[index] if block.ties else (stored.file, stored.offset)
            if key not in loaded:
                loaded[key] = _wrap(block.store.load(name), is_param)
            values.append(loaded[key])
        block.rest = values
        block.tier = "resident"
        block.install(values)

    def pre_forward(self, module=None, *args, **kwargs):
        """Stage the block's weights on the execution device and move ``args``/``kwargs`` there."""
        block = self.block
        if block is not None and block.tier != "resident":
            slot = self.streamer.acquire(block)
            self.slots.append(slot)
            block.install(block.staged[slot])
        elif self.streamer is not None:
            self.streamer.prefetch()
        if self.device is not None:
            args = move(args, self.device)
            kwargs = move(kwargs, self.device, self.skip)
        return args, kwargs

    def post_forward(self, module, output):
        """Put the block's at-rest tensors back (the staging slab may be refilled once the compute has run)."""
        if self.slots:
            slot = self.slots.pop()
            block = self.block
            block.install(block.rest)
            self.streamer.release(block, slot)
        return output

    def forward(self, *args, **kwargs):
        block = self.block
        if block is not None and block.experts is not None and block.tier != "resident":
            return routed_forward(self, args, kwargs)
        return self.run_staged(args, kwargs)

    def run_staged(self, args, kwargs):
        """Stage the whole block (if offloaded), move the inputs, run, and put the tensors at rest back."""
        caller = first_device(args, kwargs) if self.io_same_device else None
        args, kwargs = self.pre_forward(self.module, *args, **kwargs)
        try:
            output = self.call(args, kwargs)
        finally:
            self.post_forward(self.module, None)
        if caller is not None:
            output = move(output, caller)
        return output

    def call(self, args, kwargs):
        """The wrapped forward, with a GPU out-of-memory error turned into one that names the block."""
        # transformers may swap the wrapped forward (``keep_accelerate_hooks``) by setting ``_old_forward``
        original = self.module.__dict__.get("_old_forward", self.original)
        try:
            return original(*args, **kwargs)
        except torch.OutOfMemoryError as exc:
            if isinstance(exc, OutOfMemoryError):
                raise
            where = self.block.name if self.block is not None else "the model"
            raise OutOfMemoryError(
                f"out of GPU memory in block {where or '(root)'} on {self.device}: the device map leaves too little room for "
                "activations; pass a smaller max_memory for that GPU (or fewer tokens per forward)"
            ) from exc
