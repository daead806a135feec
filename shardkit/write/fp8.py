"""``--dequantize``: FP8 weights with their scales become bf16/fp16/fp32 weights, computed in row chunks.

Recognised layouts (the tensor names are those of DeepSeek-V3 releases, transformers' ``FineGrainedFP8Config``
and compressed-tensors):

- block-wise: ``X`` in ``F8_E4M3``/``F8_E5M2`` with ``X_scale_inv`` of shape ``[..., ceil(out/b0), ceil(in/b1)]``,
  the block ``[b0, b1]`` from ``quantization_config.weight_block_size`` in config.json (default 128×128);
- per-tensor (``X_scale`` with one element) or per-channel (``X_scale`` of shape ``[..., out, 1]`` or ``[..., out]``).

The value is the reference formula ``(fp32(q) × fp32(s[i // b0, j // b1])).to(dtype)`` (ragged edge blocks use
their block's scale), so the output equals torch's float32 computation bit for bit. transformers' own
``Fp8Dequantize`` derives the block from the shapes (rows // scale rows), which is wrong for ragged shapes: the
configured block is used here, with ceil-division. Scales (and activation ``input_scale`` tensors of the same
layers) are dropped. Each weight is read and converted a chunk of rows at a time, so memory stays near one
chunk whatever the model's size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from ..dtypes import nbytes_of
from ..errors import UsageError
from ..table import Checkpoint, TensorEntry
from .derived import ComputedEntry, Reader, byte_ranges

#: The FP8 element types a weight may be stored in (``F8_E8M0`` is a scale format, not a weight format).
FP8_WEIGHTS = frozenset({"F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})

DEFAULT_BLOCK = (128, 128)

#: float32 bytes of one chunk of rows being converted (a bounded working set per weight).
CHUNK_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Dequantize:
    """``weight × scale`` where each scale element covers a ``block = (rows, cols)`` tile of each matrix."""

    weight: TensorEntry
    scale: TensorEntry
    block: tuple[int, int]

    @property
    def inputs(self) -> tuple[TensorEntry, ...]:
        return (self.weight, self.scale)

    def chunks(self, read: Reader, dtype: str) -> Iterator[memoryview]:
        import torch

        from ..dtypes import torch_dtype
        from .files import tensor_bytes

        weight = self.weight
        rows, cols = weight.shape[-2], weight.shape[-1]
        matrices = math.prod(weight.shape[:-2])
        block_rows, block_cols = self.block
        scale_rows, scale_cols = -(-rows // block_rows), -(-cols // block_cols)
        scales = read.tensor(self.scale).to(torch.float32).reshape(matrices, scale_rows, scale_cols)
        out_dtype, fp8 = torch_dtype(dtype), torch_dtype(weight.dtype)
        step = max(1, CHUNK_BYTES // max(1, cols * 4))
        ranges = byte_ranges(weight)
        whole = None if ranges is not None and len(ranges) == 1 else read.tensor(weight).reshape(matrices, rows, cols)
        row_bytes = cols  # one byte per FP8 element
        for matrix in range(matrices):
            for start in range(0, rows, step):
                stop = min(rows, start + step)
                if whole is not None:
                    quantized = whole[matrix, start:stop]
                else:  # one byte range (see ``whole``): read just these rows
                    assert ranges is not None
                    file, offset, _ = ranges[0]
                    raw = read.pread(file, offset + (matrix * rows + start) * row_bytes, (stop - start) * row_bytes)
                    quantized = torch.frombuffer(raw, dtype=torch.uint8).view(fp8).reshape(stop - start, cols)
                first = start // block_rows
                tile = scales[matrix, first : -(-stop // block_rows)]
                skip = start - first * block_rows  # rows of the first block before this chunk
                row_scales = tile.repeat_interleave(block_rows, dim=0)[skip : skip + stop - start]  # [rows, scale_cols]
                value = _scaled(quantized.to(torch.float32), row_scales, block_cols, out_dtype)
                yield tensor_bytes(value)  # a view of ``value``, which stays alive until the next chunk


def _scaled(values, row_scales, block_cols: int, out_dtype):
    """``values[i, j] * row_scales[i, j // block_cols]`` cast to ``out_dtype``: the same float32 products as
    multiplying by the fully expanded scale matrix, without building it (broadcast over whole column blocks,
    the ragged last block apart)."""
    import torch

    rows, cols = values.shape
    whole = cols // block_cols
    out = torch.empty((rows, cols), dtype=out_dtype)
    if whole:
        body = values[:, : whole * block_cols].reshape(rows, whole, block_cols)
        body.mul_(row_scales[:, :whole, None])
        out[:, : whole * block_cols] = body.reshape(rows, whole * block_cols)
    if cols % block_cols:
        out[:, whole * block_cols :] = values[:, whole * block_cols :] * row_scales[:, whole : whole + 1]
    return out


def block_size(config: dict | None) -> tuple[int, int]:
    """``quantization_config.weight_block_size`` of config.json, or 128×128."""
    quantization = (config or {}).get("quantization_config") or {}
    block = quantization.get("weight_block_size") if isinstance(quantization, dict) else None
    if block is None:
        return DEFAULT_BLOCK
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise UsageError(
            f"--dequantize: config.json's quantization_config.weight_block_size is {block!r}, not two positive integers",
            code="scale-shape",
        )
    return block[0], block[1]


def dequantize_entries(
    checkpoint: Checkpoint,
    entries: dict[str, TensorEntry],
    target: str,
    config: dict | None,
    origin: dict[str, tuple[str, ...]],
) -> dict[str, TensorEntry]:
    """``entries`` with every FP8 weight replaced by a computed ``target`` weight and its scales removed."""
    weights = [e for e in entries.values() if e.dtype in FP8_WEIGHTS and e.alias_of is None]
    if not weights:
        raise UsageError(
            f"--dequantize: {checkpoint.source} holds no FP8 tensors (F8_E4M3/F8_E5M2); nothing to dequantize", code="no-fp8"
        )
    block = block_size(config)
    replaced: dict[str, ComputedEntry] = {}
    removed: set[str] = set()
    for weight in weights:
        recipe = _recipe(weight, entries, block)
        replaced[weight.name] = ComputedEntry(
            name=weight.name,
            dtype=target,
            shape=weight.shape,
            nbytes=nbytes_of(target, weight.shape) or 0,
            file=weight.file,
            offset=None,
            recipe=recipe,
        )
        origin[weight.name] = (weight.name, recipe.scale.name)
        removed.add(recipe.scale.name)
        module = weight.name.rsplit(".", 1)[0] if weight.name.endswith(".weight") else None
        if module is not None and f"{module}.input_scale" in entries:
            removed.add(f"{module}.input_scale")
    out: dict[str, TensorEntry] = {}
    for name, entry in entries.items():
        if name in removed or (entry.alias_of is not None and entry.alias_of in removed):
            continue
        if name in replaced:
            out[name] = replaced[name]
        elif entry.alias_of in replaced:
            out[name] = replace_alias(entry, replaced[entry.alias_of])
        else:
            out[name] = entry
    return out


def replace_alias(alias: TensorEntry, kept: ComputedEntry) -> ComputedEntry:
    """An alias of a dequantized weight: the same computed tensor under the alias's name."""
    from dataclasses import replace

    return replace(kept, name=alias.name, alias_of=kept.name)


def _recipe(weight: TensorEntry, entries: dict[str, TensorEntry], block: tuple[int, int]) -> Dequantize:
    if len(weight.shape) < 2:
        raise UsageError(f"--dequantize: FP8 tensor {weight.name} is {list(weight.shape)}, not a matrix", code="scale-shape")
    rows, cols = weight.shape[-2], weight.shape[-1]
    lead = weight.shape[:-2]
    block_scale = entries.get(f"{weight.name}_scale_inv")
    if block_scale is not None:
        expected = (*lead, -(-rows // block[0]), -(-cols // block[1]))
        if block_scale.shape != expected:
            raise UsageError(
                f"--dequantize: scale {block_scale.name} is {list(block_scale.shape)}, but weight {weight.name} "
                f"{list(weight.shape)} with {block[0]}x{block[1]} blocks needs {list(expected)}",
                code="scale-shape",
            )
        return Dequantize(weight, block_scale, block)
    scale = entries.get(f"{weight.name}_scale")
    if scale is None:
        raise UsageError(
            f"--dequantize: FP8 tensor {weight.name} has no scale ({weight.name}_scale_inv or {weight.name}_scale)",
            code="fp8-no-scale",
        )
    numel = math.prod(scale.shape)
    if numel == 1:  # per tensor
        if lead:
            raise UsageError(
                f"--dequantize: scale {scale.name} {list(scale.shape)} has one element for weight {weight.name} "
                f"{list(weight.shape)}, which holds {math.prod(lead)} matrices",
                code="scale-shape",
            )
        return Dequantize(weight, scale, (rows, cols))
    if scale.shape in ((*lead, rows, 1), (*lead, rows)):  # per output channel
        return Dequantize(weight, scale, (1, cols))
    raise UsageError(
        f"--dequantize: scale {scale.name} is {list(scale.shape)}, but weight {weight.name} {list(weight.shape)} needs one "
        f"element (per tensor) or {[*lead, rows, 1]} (per channel)",
        code="scale-shape",
    )
