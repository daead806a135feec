"""Element types, named the way safetensors names them.

shardkit's own dtype vocabulary is the safetensors one (``"F32"``, ``"BF16"``…), extended by the few torch types
safetensors cannot hold (``"C128"``, ``"C32"``). Nothing here imports torch: torch dtypes are handled by name.
"""

from __future__ import annotations

from .errors import UsageError

#: Bits per element of every dtype shardkit knows. Sub-byte types are packed.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    # torch-only: a .bin may hold them, a .safetensors file cannot.
    "C32": 32,
    "C128": 128,
}

#: The dtypes a .safetensors header may name.
SAFETENSORS_DTYPES = frozenset(DTYPE_BITS) - {"C32", "C128"}

#: shardkit dtype -> attribute name in the ``torch`` module. (safetensors' F4 stores a logical shape, torch's
#: float4_e2m1fn_x2 a packed one, and F6 has no torch type: none of them map.)
TORCH_NAMES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "C32": "complex32",
    "C64": "complex64",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
    "C128": "complex128",
}
FROM_TORCH_NAME: dict[str, str] = {v: k for k, v in TORCH_NAMES.items()}

#: Legacy typed-storage classes (``torch.FloatStorage``…) as they appear in a pickle -> dtype.
STORAGE_CLASSES: dict[str, str] = {
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
    "ComplexFloatStorage": "C64",
    "ComplexDoubleStorage": "C128",
}

#: Floating-point dtypes: the ones a ``--dtype`` cast applies to (integers and bools are never cast).
FLOATING = frozenset({"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F4"})

_USER_NAMES = {
    "fp32": "F32",
    "float32": "F32",
    "float": "F32",
    "f32": "F32",
    "fp16": "F16",
    "float16": "F16",
    "half": "F16",
    "f16": "F16",
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp64": "F64",
    "float64": "F64",
    "double": "F64",
    "f64": "F64",
}


#: What ``--dtype`` accepts, in the words its help and its errors both use.
CAST_CHOICES_TEXT = "bf16, fp16, fp32, fp64 or auto (config.json's dtype)"


def parse_dtype(name: str) -> str:
    """Turn a user's dtype (``bf16``, ``torch.float16``, ``F32``) into shardkit's name; raise UsageError."""
    key = name.strip()
    if key.startswith("torch."):
        key = key[len("torch.") :]
    if key.upper() in DTYPE_BITS:
        return key.upper()
    if key.lower() in _USER_NAMES:
        return _USER_NAMES[key.lower()]
    if key in FROM_TORCH_NAME:
        return FROM_TORCH_NAME[key]
    raise UsageError(f"unknown dtype {name!r}: use one of bf16, fp16, fp32, fp64")


def nbytes_of(dtype: str, shape: tuple[int, ...]) -> int | None:
    """Bytes that ``shape`` elements of ``dtype`` occupy, or None when they don't fill whole bytes."""
    numel = 1
    for dim in shape:
        numel *= dim
    bits = numel * DTYPE_BITS[dtype]
    return bits // 8 if bits % 8 == 0 else None


def itemsize(dtype: str) -> int:
    """Bytes per element, rounded up for packed sub-byte types (alignment and strides use this)."""
    return max(1, DTYPE_BITS[dtype] // 8)


def torch_dtype(dtype: str):
    """The ``torch.dtype`` for a shardkit dtype. Imports torch: call only where tensors are materialized."""
    import torch

    try:
        return getattr(torch, TORCH_NAMES[dtype])
    except (KeyError, AttributeError):
        raise UsageError(f"dtype {dtype} is not supported by this version of torch") from None


def from_torch_dtype(torch_dtype_obj) -> str:
    """shardkit's name for a ``torch.dtype``."""
    name = str(torch_dtype_obj).removeprefix("torch.")
    try:
        return FROM_TORCH_NAME[name]
    except KeyError:
        raise UsageError(f"torch dtype {name} has no safetensors equivalent") from None
