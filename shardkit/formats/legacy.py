"""Legacy (pre-1.6, non-zip) torch files: a sequence of pickles followed by raw storages.

Their storages can't be located without running torch's loader, so shardkit reads them through
``torch.load(weights_only=True)`` — safe, but it materializes every tensor in RAM. The loaded state dict is kept
so that later materialization (:mod:`shardkit.materialize`) doesn't load the file twice.
"""

from __future__ import annotations

import os

from ..dtypes import from_torch_dtype
from ..errors import CheckpointError, ShardkitError
from ..table import FileInfo, TensorEntry

#: The magic number torch writes as the first pickle of a legacy file (protocol 2: PROTO, LONG1 of 10 bytes).
LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

_loaded: dict[tuple[str, int, int], dict] = {}


def load_legacy(path: str) -> dict:
    """``{name: torch.Tensor}`` of a legacy file, loaded once per process with ``weights_only=True``."""
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _loaded:
        import pickle

        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                path, f"refused by torch's weights-only loader: {str(exc).splitlines()[0]}", code="unsafe-pickle"
            ) from None
        except Exception as exc:
            raise CheckpointError(
                path, f"not a readable legacy torch file ({type(exc).__name__}: {exc})"[:300], code="legacy-corrupt"
            ) from None
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            for wrapper in ("state_dict", "model", "model_state_dict", "module", "net"):
                if isinstance(obj.get(wrapper), dict):
                    obj = obj[wrapper]
                    break
        if not isinstance(obj, dict):
            raise CheckpointError(path, f"holds a {type(obj).__name__}, not a state dict", code="not-a-state-dict")
        _loaded[key] = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return _loaded[key]


def read_legacy(path: str) -> tuple[FileInfo, list[TensorEntry]]:
    """Entries of a legacy file; they have no byte range (``offset`` None), their data comes from :func:`load_legacy`."""
    state = load_legacy(path)
    first_name_of: dict[tuple, str] = {}
    for name in sorted(state):
        first_name_of.setdefault(_identity(state[name]), name)
    entries = []
    for name, tensor in state.items():
        try:
            dtype = from_torch_dtype(tensor.dtype)
        except ShardkitError:
            raise CheckpointError(
                path, f"tensor {name!r} has dtype {tensor.dtype}, which shardkit does not support", code="unsupported-tensor"
            ) from None
        first = first_name_of[_identity(tensor)]
        entries.append(
            TensorEntry(
                name=name,
                dtype=dtype,
                shape=tuple(tensor.shape),
                nbytes=tensor.numel() * tensor.element_size(),
                file=path,
                offset=None,
                alias_of=None if first == name else first,
            )
        )
    info = FileInfo(path=path, format="torch-legacy", size=os.path.getsize(path), tensors=[e.name for e in entries])
    return info, entries


def _identity(tensor) -> tuple:
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
