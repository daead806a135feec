"""Stream a checkpoint into a model, tensor by tensor, each straight to the device its device map gives it.

Host memory stays at a few read-ahead chunks (plus, for tensors that are not plain contiguous byte ranges, the
largest such tensor): nothing proportional to a shard or to the model, apart from the weights that are meant
to live on the CPU. CPU-tier weights of a model that also uses a GPU are written into one pinned slab per block
as they are read, ready for the dispatcher's one-copy-per-block streaming; pinning costs no second pass.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import NamedTuple

from ..dtypes import from_torch_dtype, torch_dtype
from ..errors import CheckpointError, UsageError
from ..materialize import load_tensor
from ..reader import open_checkpoint
from ..table import Checkpoint
from . import slab
from .devicemap import block_module, check_device_map, covering_key, device_for, main_device, torch_device
from .measure import as_torch_dtype
from .offload import OffloadStore, OffloadWriter, Stored, stamp
from .readahead import PARALLEL_PIECE, PARALLEL_THREADS, ReadAhead, read_direct
from .targets import Target, model_tensors


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


def load_checkpoint_in_model(
    model,
    checkpoint,
    device_map: dict | None = None,
    offload_folder: str | os.PathLike | None = None,
    dtype=None,
    offload_state_dict: bool = False,
    offload_buffers: bool = False,
    keep_in_fp32_modules: list[str] | None = None,
    strict: bool = False,
) -> LoadResult:
    """Load ``checkpoint`` (anything :func:`shardkit.open_checkpoint` opens, or a Checkpoint) into ``model``.

    Each tensor goes to ``device_map``'s device for it (GPU index, ``"cpu"`` or ``"disk"``; without a map, where the
    model's tensor already is, or the CPU for meta tensors). Floating tensors are cast once, to ``dtype`` when given,
    else to the model's own dtype. Disk-mapped tensors stay on the meta device and are recorded in an offload store
    (pointing into the checkpoint's own safetensors files when no cast is needed; otherwise written once into
    ``offload_folder``). Buffers of offloaded modules go to the main device unless ``offload_buffers``.

    Missing and unexpected keys are warned about, or raise with ``strict=True``; a missing tensor the model has no
    value for (meta) always raises. ``offload_state_dict`` is accepted for compatibility: loading is streamed anyway.
    Returns the missing and unexpected keys.
    """
    import torch

    if not isinstance(checkpoint, Checkpoint):
        checkpoint = open_checkpoint(checkpoint)
    dtype = as_torch_dtype(dtype)
    if device_map is not None:
        check_device_map(model, device_map)
    main = main_device(device_map)
    targets = model_tensors(model)
    rename = _renamer(model, checkpoint, [n for t in targets for n in t.names])
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
    problems = []
    if missing:
        problems.append(
            f"missing {len(missing)} tensor(s) the model has: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )
    if unexpected:
        problems.append(
            f"{len(unexpected)} tensor(s) the model lacks: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )
    if problems:
        if strict:
            raise CheckpointError(checkpoint.source, "; ".join(problems), code="missing-keys" if missing else "unexpected-keys")
        warnings.warn(f"{checkpoint.source}: {'; '.join(problems)} (missing ones keep their initial values)", stacklevel=2)

    loaded = [t for t in targets if t.entry is not None]
    modules = dict(model.named_modules())
    for t in targets:
        key = covering_key(t.names[0], device_map) if device_map else ""
        t.block = block_module(key, t.names[0], modules) if key is not None else ""
    pin = torch.cuda.is_available() and main.type == "cuda"
    host = _allocate(loaded, pin)
    store = _stream(checkpoint, loaded, offload_folder)
    _install(model, targets, host, store, offload_folder)
    return LoadResult(missing, unexpected)


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


def _stream(checkpoint: Checkpoint, targets: list[Target], offload_folder) -> OffloadStore | None:
    """Read every loaded tensor once, in file order, into its destination or offload file."""
    import torch

    by_entry: dict[str, list[Target]] = {}
    for t in targets:
        stored = t.entry.alias_of or t.entry.name
        by_entry.setdefault(stored, []).append(t)
    order = sorted(by_entry, key=lambda n: (checkpoint.entries[n].file, checkpoint.entries[n].offset or 0))

    disk_stored: dict[str, Stored] = {}
    stamps: dict[str, dict] = {}
    to_write: dict[str, list[Target]] = {}
    for name in order:
        entry = checkpoint.entries[name]
        for t in by_entry[name]:
            if t.device != "disk":
                continue
            fmt = checkpoint.file(entry.file).format if entry.file else ""
            if fmt == "safetensors" and entry.offset is not None and torch_dtype(entry.dtype) == t.dtype:
                disk_stored[t.names[0]] = Stored(entry.file, entry.offset, entry.nbytes, entry.dtype, tuple(entry.shape))
                if entry.file not in stamps:
                    stamps[entry.file] = stamp(entry.file)
            else:
                to_write.setdefault(t.block, []).append(t)
    if to_write and offload_folder is None:
        names = [t.names[0] for ts in to_write.values() for t in ts]
        raise UsageError(
            f"the device map puts {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} on disk, and they must be written out "
            "(cast to another dtype, or not in a safetensors file): pass offload_folder"
        )
    writers = {}
    if to_write:
        os.makedirs(offload_folder, exist_ok=True)
        for block, members in to_write.items():
            file_name = re.sub(r"[^A-Za-z0-9_.-]", "_", block or "model") + ".safetensors"
            specs = [
                (t.names[0], from_torch_dtype(t.dtype), tuple(t.old.shape), t.old.numel() * t.dtype.itemsize) for t in members
            ]
            writers[block] = OffloadWriter(os.path.join(os.fspath(offload_folder), file_name), specs)

    def sinks_for(t: Target, source_dtype):
        """Functions taking (uint8 chunk, byte start) that put the chunk where ``t`` wants it."""
        if t.device == "disk":
            writer = writers[t.block]
            if source_dtype == t.dtype:
                return lambda chunk, start: writer.write_at(t.names[0], start, chunk.numpy())
            scale = t.dtype.itemsize / source_dtype.itemsize

            def cast_and_write(chunk, start):
                # one reusable cast buffer: per-chunk temporaries would fragment the heap and grow the RSS
                count = chunk.numel() // source_dtype.itemsize
                buffer = scratch.get(t.dtype)
                if buffer is None or buffer.numel() < count:
                    buffer = scratch[t.dtype] = torch.empty(count, dtype=t.dtype)
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

    jobs, job_sinks, direct = [], [], []
    scratch: dict = {}
    try:
        for name in order:
            entry = checkpoint.entries[name]
            members = [t for t in by_entry[name] if not (t.device == "disk" and t.names[0] in disk_stored)]
            if not members or entry.nbytes == 0:
                continue
            source = torch_dtype(entry.dtype)
            sinks = [sinks_for(t, source) for t in members]
            if entry.offset is None:  # a strided view or a legacy file: materialize, then hand over whole
                whole = slab.as_bytes(load_tensor(entry).contiguous())
                for sink in sinks:
                    sink(whole, 0)
            elif (
                len(members) == 1
                and members[0].device != "disk"
                and members[0].device.type == "cpu"
                and source == members[0].dtype
            ):
                direct.append((entry, slab.as_bytes(members[0].dest)))  # straight into place, no staging copy
            else:
                jobs.append((entry.file, entry.offset, entry.nbytes))
                job_sinks.append((sinks, any(t.device != "disk" and t.device.type == "cuda" for t in members)))
        read_direct(direct)
        if jobs:
            gpu = any(flag for _, flag in job_sinks)
            # GPU destinations: several reads in flight into a ring of small pinned buffers; host-only work
            # (casts, offload writes) is bound by the cast, so one reader and three buffers suffice.
            # Two buffers per thread (16 x 16 MiB pinned): each thread reads one while the other's copy runs.
            parallel = dict(chunk=PARALLEL_PIECE, depth=2 * PARALLEL_THREADS, threads=PARALLEL_THREADS)
            reader = ReadAhead(jobs, pin=True, **parallel) if gpu and torch.cuda.is_available() else ReadAhead(jobs)
            try:
                for chunk in reader:
                    sinks, on_gpu = job_sinks[chunk.job]
                    for sink in sinks:
                        sink(chunk.data, chunk.start)
                    event = None
                    if on_gpu:
                        event = torch.cuda.Event()
                        event.record()
                    reader.release(chunk, event)
            finally:
                reader.close()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        for writer in writers.values():
            for stored_name, stored in writer.finish().items():
                disk_stored[stored_name] = stored
            stamps[writer.path] = stamp(writer.path)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    if not disk_stored:
        return None
    return OffloadStore(disk_stored, stamps, os.fspath(offload_folder) if offload_folder is not None else None)


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
        for module, attr, param in t.places:
            (module._parameters if param else module._buffers)[attr] = value
    model._shardkit_host = host
    if store is not None:
        for t in targets:
            if t.device == "disk" and t.entry is not None:
                for alias in t.names[1:]:
                    store.tensors[alias] = store.tensors[t.names[0]]
        store.save()
    model._shardkit_offload = store
