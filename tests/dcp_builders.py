"""DCP (torch.distributed.checkpoint) folders saved by real gloo process groups on CPU, with torch's own reassembly.

Run as a script: ``python tests/dcp_builders.py OUT`` spawns 4 ranks once and saves every fixture folder under
OUT, then writes ``<folder>.pt`` with ``dcp_to_torch_save`` beside each. Process groups start slowly, so the
test session builds them once (``dcp_folders`` in conftest.py).
"""

from __future__ import annotations

import os
import socket
import sys

import torch

WORLD = 4

#: fixture name -> what it holds
FOLDERS = {
    "fsdp": "FSDP2-style training state: {'model': Shard(0) DTensors, 'optim': Adam state, 'step': 11}",
    "tp": "flat state dict: Shard(1), 3-D Shard(1), 2-D meshes, replicated and plain tensors",
    "st": "the 'tp' state dict saved with SerializationFormat.SAFETENSORS",
    "hf": "the 'tp' state dict saved by HuggingFaceStorageWriter(save_distributed=True): shard-*.safetensors, no .metadata",
}


def model_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """Full model tensors; dim 0 sizes chosen for uneven (10 over 4: 3,3,3,1) and empty ranks (2 over 4)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(10, 8, generator=g).bfloat16(),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g).bfloat16(),
        "model.layers.0.input_layernorm.weight": torch.randn(8, generator=g),
        "model.tiny": torch.randn(2, 4, generator=g),
        "model.position_ids": torch.arange(6, dtype=torch.int64),
        "lm_head.weight": torch.randn(12, 8, generator=g).bfloat16(),
    }


def tp_tensors(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "col.weight": torch.randn(8, 10, generator=g),  # Shard(1): 3,3,3,1 columns
        "col3d.weight": torch.randn(4, 6, 5, generator=g).bfloat16(),  # Shard(1) of a 3-D tensor
        "colint.weight": torch.randint(-1000, 1000, (5, 8), generator=g, dtype=torch.int32),
        "mesh01.weight": torch.randn(6, 8, generator=g),  # 2x2 mesh [Shard(0), Shard(1)]
        "mesh10.weight": torch.randn(6, 8, generator=g).bfloat16(),  # 2x2 mesh [Shard(1), Shard(0)]
        "mesh00.weight": torch.randn(9, 3, generator=g),  # 2x2 mesh [Shard(0), Shard(0)]
        "rep.bias": torch.randn(7, generator=g),  # Replicate()
        "plain.scale": torch.tensor(2.5),  # a plain (non-DTensor) 0-d tensor
    }


def _state(kind: str, rank: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    if kind == "fsdp":
        model = {name: distribute_tensor(t, mesh, [Shard(0)]) for name, t in model_tensors().items()}
        g = torch.Generator().manual_seed(2)
        state = {}
        for name, t in model_tensors().items():
            if not t.is_floating_point():
                continue
            moments = {
                "step": torch.tensor(3.0),
                "exp_avg": distribute_tensor(torch.randn(t.shape, generator=g), mesh, [Shard(0)]),
                "exp_avg_sq": distribute_tensor(torch.rand(t.shape, generator=g), mesh, [Shard(0)]),
            }
            state[name] = moments
        optim = {"state": state, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": list(state)}]}
        return {"model": model, "optim": optim, "step": 11}
    mesh2 = init_device_mesh("cpu", (2, 2))
    full = tp_tensors()
    return {
        "col.weight": distribute_tensor(full["col.weight"], mesh, [Shard(1)]),
        "col3d.weight": distribute_tensor(full["col3d.weight"], mesh, [Shard(1)]),
        "colint.weight": distribute_tensor(full["colint.weight"], mesh, [Shard(1)]),
        "mesh01.weight": distribute_tensor(full["mesh01.weight"], mesh2, [Shard(0), Shard(1)]),
        "mesh10.weight": distribute_tensor(full["mesh10.weight"], mesh2, [Shard(1), Shard(0)]),
        "mesh00.weight": distribute_tensor(full["mesh00.weight"], mesh2, [Shard(0), Shard(0)]),
        "rep.bias": distribute_tensor(full["rep.bias"], mesh, [Replicate()]),
        "plain.scale": full["plain.scale"],
    }


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for kind in FOLDERS:
            state = _state("fsdp" if kind == "fsdp" else "tp", rank)
            if kind == "hf":
                writer = dcp.HuggingFaceStorageWriter(os.path.join(out, kind), save_distributed=True)
            else:
                fmt = SerializationFormat.SAFETENSORS if kind == "st" else SerializationFormat.TORCH_SAVE
                writer = dcp.FileSystemWriter(os.path.join(out, kind), serialization_format=fmt)
            dcp.save(state, storage_writer=writer)
    finally:
        dist.destroy_process_group()


def build(out: str) -> None:
    """Save every fixture folder under ``out`` from 4 gloo ranks, then torch's reassembly ``<folder>.pt`` of each."""
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_worker, args=(port, out), nprocs=WORLD)
    for kind in FOLDERS:
        if kind in ("st", "hf"):
            continue  # dcp_to_torch_save cannot read these (torch's FileSystemReader fails on SAFETENSORS chunks)
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        dcp_to_torch_save(os.path.join(out, kind), os.path.join(out, kind + ".pt"))


def write_dcp(folder: str | os.PathLike, tensors: dict[str, tuple[torch.Tensor, int | None]], parts: int = WORLD) -> None:
    """A DCP folder laid out as ``FileSystemWriter`` lays one out, without process groups: each tensor cut into
    ``parts`` chunks along its dim (``torch.tensor_split``; None: saved whole by rank 0), chunk ``i`` appended to
    ``__{i}_0.distcp`` as a ``torch.save`` archive, and ``.metadata`` pickled from torch's own classes."""
    import io
    import pickle

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    os.makedirs(folder, exist_ok=True)
    files = [io.BytesIO() for _ in range(parts)]
    items, storage = {}, {}
    for name, (tensor, dim) in tensors.items():
        pieces = [tensor] if dim is None else list(torch.tensor_split(tensor, parts, dim))
        chunks = []
        for rank, piece in enumerate(pieces):
            offsets = [0] * tensor.dim()
            if dim is not None:
                offsets[dim] = sum(p.shape[dim] for p in pieces[:rank])
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=piece.shape)
            chunks.append(chunk)
            start = files[rank].tell()
            torch.save(piece.contiguous(), files[rank])
            index = MetadataIndex(name, offsets, len(chunks) - 1)
            storage[index] = _StorageInfo(f"__{rank}_0.distcp", start, files[rank].tell() - start)
        items[name] = TensorStorageMetadata(TensorProperties(dtype=tensor.dtype), tensor.shape, chunks)
    for rank, data in enumerate(files):
        with open(os.path.join(folder, f"__{rank}_0.distcp"), "wb") as handle:
            handle.write(data.getvalue())
    metadata = Metadata(items, planner_data={name: (name,) for name in tensors}, storage_data=storage, version="1.0.0")
    with open(os.path.join(folder, ".metadata"), "wb") as handle:
        pickle.dump(metadata, handle)


def flatten(state: dict, prefix: str = "") -> dict:
    """DCP's flat names for a nested state dict (``optim.param_groups.0.lr``): dict keys and list indexes joined by dots."""
    flat = {}
    items = state.items() if isinstance(state, dict) else enumerate(state)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, dict) or (isinstance(value, (list, tuple)) and value and isinstance(value[0], dict)):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


if __name__ == "__main__":
    build(sys.argv[1])
