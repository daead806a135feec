"""Stream a checkpoint into a model, tensor by tensor, each straight to the device its device map gives it.

Host memory stays at a few read-ahead chunks (plus, for tensors that are not plain contiguous byte ranges, the
largest such tensor): nothing proportional to a shard or to the model, apart from the weights that are meant
to live on the CPU. CPU-tier weights of a model that also uses a GPU are written into one pinned slab per block
as they are read, ready for the dispatcher's one-copy-per-block streaming; pinning costs no second pass.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import NamedTuple

from ..dtypes import from_torch_dtype, torch_dtype
from ..errors import CheckpointError, UsageError
from ..formats.dcp import model_weights
from ..materialize import load_tensor
from ..reader import open_checkpoint
from ..table import Checkpoint
from ..write.derived import PiecedEntry, byte_ranges
from . import slab
from .devicemap import (
    block_module,
    check_device_map,
    check_devices_present,
    covering_key,
    device_for,
    main_device,
    streaming_map,
    torch_device,
)
from .measure import as_torch_dtype
from .offload import OffloadStore, OffloadWriter, Stored, stamp
from .readahead import PARALLEL_PIECE, PARALLEL_THREADS, ReadAhead, read_direct
from .targets import Target, model_tensors

logger = logging.getLogger(__name__)


class StateDictMismatchError(CheckpointError, RuntimeError, ValueError):
    """``strict=True`` and the checkpoint's keys differ from the model's.

    Both a ``RuntimeError`` (what ``torch.nn.Module.load_state_dict(strict=True)`` raises, and accelerate without a
    device map) and a ``ValueError`` (accelerate with one), so either ``except`` clause catches it.
    """

    def __init__(self, source: str, model: str, missing: list[str], unexpected: list[str]) -> None:
        self.missing_keys, self.unexpected_keys = missing, unexpected
        parts = []
        if missing:
            parts.append(f"Missing key(s) in state_dict: {_listed(missing)}.")
        if unexpected:
            parts.append(f"Unexpected key(s) in state_dict: {_listed(unexpected)}.")
        code = "missing-keys" if missing else "unexpected-keys"
        super().__init__(source, f"Error(s) in loading state_dict for {model}: {' '.join(parts)}", code=code)


def _listed(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(f'"{n}"' for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def _renamer(model, checkpoint: Checkpoint, names: list[str]):
    """Map model names to checkpoint names, adding or stripping the model's ``base_model_prefix`` if that matches more."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix:
        return lambda n: n
    keys = checkpoint.entries
    plain = sum(n in keys for n in names)
    added = sum(f"{prefix}.{n}" in keys for n in names)
    stripped = sum(n.startswith(prefix + ".") and n[len(prefix) + 1 :] in keys for n in names)
    if added > plain and added >= stripped:
        return lambda n: f"{prefix}.{n}"
    if stripped > plain:
        return lambda n: n[len(prefix) + 1 :] if n.startswith(prefix + ".") else n
    return lambda n: n


_PACKED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_PER_EXPERT = re.compile(r"\.experts\.\d+\.")


def _with_packed_experts(model, checkpoint: Checkpoint, wanted: list[str]) -> Checkpoint:
    """``checkpoint`` with per-expert tensors packed into the 3-D experts tensors ``model`` holds, if it must be.

    transformers 5 models hold packed experts (``mlp.experts.gate_up_proj [E, 2I, H]``), while their
    ``save_pretrained`` and nearly every MoE repo on the Hub store one tensor per expert. Packing is
    concatenation, so each packed tensor becomes a list of byte pieces of the stored ones (nothing is
    materialized; the disk tier reads the pieces where they lie), following transformers' own conversion
    mapping as restated in :mod:`shardkit.write.moe`.
    """
    packed = [n for n in wanted if n.endswith(_PACKED)]
    if not packed or all(n in checkpoint.entries for n in packed):
        return checkpoint
    if not any(_PER_EXPERT.search(n) for n in checkpoint.entries):
        return checkpoint  # nothing to pack: the missing keys are reported as such
    from dataclasses import replace

    from ..write.moe import relayout_experts

    config = getattr(model, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else None
    entries, _ = relayout_experts(dict(checkpoint.entries), {}, "packed", config, checkpoint.source)
    return replace(checkpoint, entries=entries)


def load_checkpoint_in_model(
    model,
    checkpoint,
    device_map: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    dtype=None,
    offload_state_dict: bool = False,
    offload_buffers: bool = False,
    keep_in_fp32_modules: list[str] | None = None,
    offload_8bit_bnb: bool = False,
    strict: bool = False,
    full_state_dict: bool = True,
    broadcast_from_rank0: bool = False,
    progress: bool | None = None,
) -> LoadResult:
    """Load ``checkpoint`` (anything :func:`shardkit.open_checkpoint` opens, or a Checkpoint) into ``model``.

    Each tensor goes to ``device_map``'s device for it (GPU index, ``"cpu"`` or ``"disk"``; without a map, where the
    model's tensor already is, or the CPU for meta tensors). Floating tensors are cast once, to ``dtype`` when given,
    else to the model's own dtype. Disk-mapped tensors stay on the meta device and are recorded in an offload store
    (pointing into the checkpoint's own safetensors files when no cast is needed; otherwise written once into
    ``offload_folder``). Buffers of offloaded modules go to the main device unless ``offload_buffers``.

    Missing and unexpected keys are logged (logger ``shardkit.bigmodel.loader``, WARNING, accelerate's wording for
    unexpected ones), or raise :class:`StateDictMismatchError` (a ``RuntimeError`` and a ``ValueError``) with
    ``strict=True``; a missing tensor the model has no value for (meta) always raises.

    accelerate's remaining parameters: ``offload_state_dict`` has nothing to do (no state dict is ever held);
    ``offload_8bit_bnb`` is honoured trivially for models without bitsandbytes 8-bit weights and refused for models
    with them; ``full_state_dict=False`` and ``broadcast_from_rank0=True`` (torch.distributed state dicts) are refused
    with a :class:`UsageError`: every process reads the checkpoint's full tensors from the files itself.
    ``progress`` (shardkit's own): a bar of the bytes read on stderr; None shows it when stderr is a terminal
    and the environment variable ``SHARDKIT_DISABLE_PROGRESS_BARS`` is not set (as transformers' loading bar
    heeds ``HF_HUB_DISABLE_PROGRESS_BARS``, which turns it off too). Returns the missing and unexpected keys.
    """
    import torch

    _check_unsupported(model, device_map, offload_8bit_bnb, full_state_dict, broadcast_from_rank0)

    if not isinstance(checkpoint, Checkpoint):
        checkpoint = open_checkpoint(checkpoint)
    checkpoint, _ = model_weights(checkpoint)  # a DCP training state dict: its model group
    dtype = as_torch_dtype(dtype)
    if device_map is not None:
        check_device_map(model, device_map)
        check_devices_present(device_map)
    main = main_device(device_map)
    targets = model_tensors(model)
    rename = _renamer(model, checkpoint, [n for t in targets for n in t.names])
    checkpoint = _with_packed_experts(model, checkpoint, [rename(n) for t in targets for n in t.names])
    keep_fp32 = [re.compile(rf"(^|\.){re.escape(m)}(\.|$)") for m in keep_in_fp32_modules or []]

    missing, hopeless, used = [], [], set()
    for target in targets:
        keys = [rename(n) for n in target.names]
        entry = next((checkpoint.entries[k] for k in keys if k in checkpoint.entries), None)
        used.update(k for k in keys if k in checkpoint.entries)
        name = target.names[0]
        if entry is not None:
            if tuple(entry.shape) != tuple(target.old.shape):
                raise CheckpointError(
                    entry.file,
                    f"tensor {entry.name!r} has shape {list(entry.shape)} but the model's {name!r} has {list(target.old.shape)}",
                    code="shape-mismatch",
                )
            target.entry = entry
        elif target.persistent:
            missing.append(name)
        _place(target, device_map, main, offload_buffers)
        if entry is None and target.old.device.type == "meta" and (target.persistent or target.device != "disk"):
            hopeless.append(name)
        old = target.old.dtype
        if not old.is_floating_point:
            target.dtype = old
        elif dtype is not None:
            target.dtype = torch.float32 if any(p.search(name) for p in keep_fp32) else dtype
        else:
            target.dtype = old
    unexpected = [n for n, e in checkpoint.entries.items() if n not in used and e.alias_of is None]

    if hopeless:
        raise CheckpointError(
            checkpoint.source,
            f"holds no {', '.join(map(repr, hopeless[:5]))}{' and more' if len(hopeless) > 5 else ''}, and the "
            "model has no value for it (built on the meta device)",
            code="missing-keys",
        )
    if strict and (missing or unexpected):
        raise StateDictMismatchError(checkpoint.source, type(model).__name__, missing, unexpected)
    if unexpected:
        # accelerate's wording (users and tests grep for "were not used when initializing")
        logger.warning(
            "Some weights of the model checkpoint at %s were not used when initializing %s: %s. This may or may not be "
            "an issue - make sure that the checkpoint does not have unnecessary parameters, or that the model "
            "definition correctly corresponds to the checkpoint.",
            checkpoint.source,
            type(model).__name__,
            _listed(unexpected),
        )
    if missing:
        # transformers' wording; accelerate says nothing and leaves them as they are
        logger.warning(
            "Some weights of %s were not initialized from the model checkpoint at %s and keep their initial values: %s",
            type(model).__name__,
            checkpoint.source,
            _listed(missing),
        )

    loaded = [t for t in targets if t.entry is not None]
    modules = dict(model.named_modules())
    blocks = streaming_map(model, device_map, main) if device_map else None  # the dispatcher's blocks
    for t in targets:
        key = covering_key(t.names[0], blocks) if blocks else ""
        t.block = block_module(key, t.names[0], modules) if key is not None else ""
    pin = main.type == "cuda"  # ask CUDA nothing for a CPU/disk map: not even is_available()
    host = _allocate(loaded, pin)
    store = _stream(checkpoint, loaded, offload_folder, progress)
    _install(model, targets, host, store, offload_folder)
    return LoadResult(missing, unexpected)


def _check_unsupported(model, device_map, offload_8bit_bnb, full_state_dict, broadcast_from_rank0) -> None:
    if not full_state_dict:
        raise UsageError(
            "full_state_dict=False (a sharded torch.distributed state dict) is not supported: shardkit loads the "
            "checkpoint's full tensors"
        )
    if broadcast_from_rank0:
        raise UsageError(
            "broadcast_from_rank0=True is not supported: every process streams the tensors it needs from the "
            "checkpoint files itself; load without it"
        )
    if offload_8bit_bnb and device_map and any(type(p).__name__ == "Int8Params" for p in model.parameters()):
        raise UsageError("offload_8bit_bnb=True: shardkit does not offload bitsandbytes 8-bit weights; keep them on a GPU")


def _place(target: Target, device_map, main, offload_buffers: bool) -> None:
    import torch

    if device_map is None:
        device = target.old.device
        target.device = torch.device("cpu") if device.type == "meta" else device
        return
    device = torch_device(device_for(target.names[0], device_map))
    is_buffer = not target.places[0][2]
    offloaded = device == "disk" or (device == torch.device("cpu") and main.type != "cpu")
    if is_buffer and offloaded and not offload_buffers:
        device = main  # buffers of offloaded blocks live on the execution device (accelerate's default)
    target.device = device


def _allocate(targets: list[Target], pin: bool) -> dict:
    """Destinations for resident tensors; CPU-tier tensors of a GPU model go into one pinned slab per block."""
    import torch

    by_block: dict[str, list[Target]] = {}
    for t in targets:
        if t.device == "disk":
            continue
        if pin and t.device.type == "cpu":
            by_block.setdefault(t.block, []).append(t)
        else:
            t.dest = torch.empty(t.old.shape, dtype=t.dtype, device=t.device)
    host = {}
    for block, members in by_block.items():
        slots, total = slab.layout([(t.names[0], t.dtype, tuple(t.old.shape)) for t in members])
        buffer = slab.allocate(total, pin=True)
        for t in members:
            t.dest = slab.view(buffer, slots[t.names[0]])
        host[block] = (buffer, slots)
    return host


def _stream(checkpoint: Checkpoint, targets: list[Target], offload_folder, progress: bool | None) -> OffloadStore | None:
    """Read every loaded tensor once, in file order, into its destination or offload file (a bar counts the bytes)."""
    by_entry: dict[str, list[Target]] = {}
    for t in targets:
        by_entry.setdefault(t.entry.alias_of or t.entry.name, []).append(t)
    order = sorted(by_entry, key=lambda n: (checkpoint.entries[n].file, checkpoint.entries[n].offset or 0))
    disk = _plan_disk(checkpoint, by_entry, order, offload_folder)
    bar = None
    try:
        direct, jobs = _plan_reads(checkpoint, by_entry, order, disk)
        bar = _loading_bar(sum(e.nbytes for e, _ in direct) + sum(j.nbytes for j in jobs), progress)
        read_direct(direct)
        if bar is not None:
            bar.update(sum(e.nbytes for e, _ in direct))
        _read_loop(jobs, bar.update if bar is not None else None)
        if any(t.device != "disk" and t.device.type == "cuda" for t in targets):
            import torch

            torch.cuda.synchronize()  # the last asynchronous copies out of the ring and out of materialized tensors
        disk.finish()
    except BaseException:
        disk.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    if not disk.stored:
        return None
    return OffloadStore(disk.stored, disk.stamps, os.fspath(offload_folder) if offload_folder is not None else None)


@dataclass
class _DiskPlan:
    """Where the disk tier's tensors will be read from: ``stored`` (already in a checkpoint safetensors file, in
    the right dtype) or a ``writers[block]`` file in the offload folder that the load fills."""

    stored: dict[str, Stored] = field(default_factory=dict)
    stamps: dict[str, dict] = field(default_factory=dict)
    writers: dict[str, OffloadWriter] = field(default_factory=dict)
    scratch: dict = field(default_factory=dict)  # one reusable cast buffer per dtype

    def finish(self) -> None:
        for writer in self.writers.values():
            self.stored.update(writer.finish())
            self.stamps[writer.path] = stamp(writer.path)

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()


def _plan_disk(checkpoint: Checkpoint, by_entry: dict, order: list[str], offload_folder) -> _DiskPlan:
    """Point disk-tier tensors into the checkpoint's own safetensors files where their bytes can be used as they
    are; open one offload file per block for the rest (raises UsageError without an ``offload_folder``)."""
    plan = _DiskPlan()
    to_write: dict[str, list[Target]] = {}
    for name in order:
        entry = checkpoint.entries[name]
        for t in by_entry[name]:
            if t.device != "disk":
                continue
            ranges = byte_ranges(entry)
            in_safetensors = bool(ranges) and all(checkpoint.file(f).format == "safetensors" for f, _, _ in ranges)
            if in_safetensors and torch_dtype(entry.dtype) == t.dtype:
                pieces = tuple(ranges) if len(ranges) > 1 else ()
                file, offset, _ = ranges[0]
                plan.stored[t.names[0]] = Stored(file, offset, entry.nbytes, entry.dtype, tuple(entry.shape), pieces)
                for path, _, _ in ranges:
                    if path not in plan.stamps:
                        plan.stamps[path] = stamp(path)
            else:
                to_write.setdefault(t.block, []).append(t)
    if to_write and offload_folder is None:
        names = [t.names[0] for ts in to_write.values() for t in ts]
        raise UsageError(
            f"the device map puts {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} on disk, and they must be written out "
            "(cast to another dtype, or not in a safetensors file): pass offload_folder"
        )
    if to_write:
        os.makedirs(offload_folder, exist_ok=True)
    for block, members in to_write.items():
        file_name = re.sub(r"[^A-Za-z0-9_.-]", "_", block or "model") + ".safetensors"
        specs = [(t.names[0], from_torch_dtype(t.dtype), tuple(t.old.shape), t.old.numel() * t.dtype.itemsize) for t in members]
        plan.writers[block] = OffloadWriter(os.path.join(os.fspath(offload_folder), file_name), specs)
    return plan


def _sink(t: Target, source_dtype, disk: _DiskPlan):
    """A function taking (uint8 chunk, byte start in the source tensor) that puts the chunk where ``t`` wants it."""
    import torch

    if t.device == "disk":
        writer = disk.writers[t.block]
        if source_dtype == t.dtype:
            return lambda chunk, start: writer.write_at(t.names[0], start, chunk.numpy())
        scale = t.dtype.itemsize / source_dtype.itemsize

        def cast_and_write(chunk, start):
            # one reusable cast buffer: per-chunk temporaries would fragment the heap and grow the RSS
            count = chunk.numel() // source_dtype.itemsize
            buffer = disk.scratch.get(t.dtype)
            if buffer is None or buffer.numel() < count:
                buffer = disk.scratch[t.dtype] = torch.empty(count, dtype=t.dtype)
            buffer[:count].copy_(chunk.view(source_dtype))
            writer.write_at(t.names[0], int(start * scale), slab.as_bytes(buffer[:count]).numpy())

        return cast_and_write
    flat, raw = t.dest.reshape(-1), slab.as_bytes(t.dest)
    if source_dtype == t.dtype:
        return lambda chunk, start: raw[start : start + chunk.numel()].copy_(chunk, non_blocking=True)
    size = source_dtype.itemsize
    return lambda chunk, start: flat[start // size : (start + chunk.numel()) // size].copy_(
        chunk.view(source_dtype), non_blocking=True
    )


class _Job(NamedTuple):
    """A byte range read through the read-ahead ring, and what takes its chunks."""

    file: str
    offset: int
    nbytes: int
    sinks: list
    on_gpu: bool
    base: int = 0  # where the range's bytes start in the tensor (a tensor assembled from several ranges)


def _plan_reads(checkpoint: Checkpoint, by_entry: dict, order: list[str], disk: _DiskPlan) -> tuple[list, list[_Job]]:
    """Split the reads: plain CPU tensors in their own dtype are read straight into place (``direct``); the rest
    (GPU destinations, casts, offload writes) go through the read-ahead ring as jobs. Tensors that are not a
    plain byte range (strided views, legacy files) are materialized and handed to their sinks here."""
    direct, jobs = [], []
    for name in order:
        entry = checkpoint.entries[name]
        members = [t for t in by_entry[name] if not (t.device == "disk" and t.names[0] in disk.stored)]
        if not members or entry.nbytes == 0:
            continue
        source = torch_dtype(entry.dtype)
        sinks = [_sink(t, source, disk) for t in members]
        ranges = byte_ranges(entry) if entry.offset is None else None
        if ranges:  # assembled from byte pieces (packed experts): one read per run, each at its place in the tensor
            on_gpu = any(t.device != "disk" and t.device.type == "cuda" for t in members)
            base = 0
            for file, offset, nbytes in ranges:
                jobs.append(_Job(file, offset, nbytes, sinks, on_gpu, base))
                base += nbytes
        elif entry.offset is None:  # a strided view or a legacy file: materialize, then hand over whole
            whole = slab.as_bytes(_materialize(entry).contiguous())
            for sink in sinks:
                sink(whole, 0)
        elif len(members) == 1 and members[0].device != "disk" and members[0].device.type == "cpu" and source == members[0].dtype:
            direct.append((entry, slab.as_bytes(members[0].dest)))  # straight into place, no staging copy
        else:
            on_gpu = any(t.device != "disk" and t.device.type == "cuda" for t in members)
            jobs.append(_Job(entry.file, entry.offset, entry.nbytes, sinks, on_gpu))
    return direct, jobs


def _materialize(entry):
    """A tensor that is not one plain byte range, read whole: a strided view, a legacy file, or byte pieces of
    such entries (experts packed from a .bin checkpoint)."""
    if isinstance(entry, PiecedEntry):
        import torch

        parts = [slab.as_bytes(load_tensor(p.entry).contiguous())[p.start : p.start + p.nbytes] for p in entry.pieces]
        return torch.cat(parts).view(torch_dtype(entry.dtype)).view(entry.shape)
    return load_tensor(entry)


def _loading_bar(total: int, progress: bool | None):
    """The load's bar, or None: ``progress`` False, or None with the opt-out variables set or no terminal."""
    if progress is None:
        progress = not any(
            os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
            for name in ("SHARDKIT_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS")
        )
    from ..progress import byte_bar

    return byte_bar(total, enabled=progress and total > 0, desc="loading")


def _read_loop(jobs: list[_Job], progress=None) -> None:
    """Feed every job's chunks to its sinks; GPU copies are ordered before their buffer is reused by CUDA events."""
    if not jobs:
        return
    import torch

    gpu = any(job.on_gpu for job in jobs)
    ranges = [(job.file, job.offset, job.nbytes) for job in jobs]
    # GPU destinations: several reads in flight into a ring of small pinned buffers; host-only work
    # (casts, offload writes) is bound by the cast, so one reader and three buffers suffice.
    # Two buffers per thread (16 x 16 MiB pinned): each thread reads one while the other's copy runs.
    if gpu:
        reader = ReadAhead(ranges, pin=True, chunk=PARALLEL_PIECE, depth=2 * PARALLEL_THREADS, threads=PARALLEL_THREADS)
    else:
        reader = ReadAhead(ranges)
    try:
        for chunk in reader:
            job = jobs[chunk.job]
            for sink in job.sinks:
                sink(chunk.data, job.base + chunk.start)
            if progress is not None:
                progress(chunk.nbytes)
            event = None
            if job.on_gpu:
                event = torch.cuda.Event()
                event.record()
            reader.release(chunk, event)
    finally:
        reader.close()


def _install(model, targets: list[Target], host: dict, store: OffloadStore | None, offload_folder) -> None:
    """Put the loaded tensors into the model (one object per tied group) and record the slabs and the store."""
    import torch

    for t in targets:
        if t.entry is None:
            continue
        if t.device == "disk":
            value = torch.empty(t.old.shape, dtype=t.dtype, device="meta")
        else:
            value = t.dest
        is_param = t.places[0][2]
        if is_param:
            value = torch.nn.Parameter(value, requires_grad=t.old.requires_grad and value.is_floating_point())
        for module, attr, param, _ in t.places:
            (module._parameters if param else module._buffers)[attr] = value
    model._shardkit_host = host
    if store is not None:
        for t in targets:
            if t.device == "disk" and t.entry is not None:
                for alias in t.names[1:]:
                    store.tensors[alias] = store.tensors[t.names[0]]
        store.save()
    model._shardkit_offload = store
