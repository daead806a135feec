"""PyTorch zip checkpoints (``torch.save`` since 1.6): read ``data.pkl`` safely and locate every storage's bytes.

The archive holds ``<prefix>/data.pkl`` (the object, with storages as persistent ids), ``<prefix>/data/<key>``
(each storage's raw bytes, stored uncompressed) and ``<prefix>/byteorder``. shardkit reads the zip's central
directory and local headers to find each record's absolute offset, and unpickles ``data.pkl`` with
:class:`RestrictedUnpickler`, which admits a subset of what ``torch.load(weights_only=True)`` admits and resolves
every global to an inert stand-in of its own: nothing is imported, nothing outside this module is called.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import BinaryIO

from ..dtypes import DTYPE_BITS, FROM_TORCH_NAME, STORAGE_CLASSES, itemsize, nbytes_of
from ..errors import CheckpointError, UnsafePickleError
from ..table import FileInfo, Storage, TensorEntry

#: data.pkl of real checkpoints is kilobytes to a few megabytes; anything larger is refused unread.
MAX_PICKLE_SIZE = 256 * 1024 * 1024

#: Keys under which training scripts commonly nest the state dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")


@dataclass(frozen=True, slots=True)
class Record:
    """A stored zip member: ``size`` bytes of data at absolute ``offset``."""

    name: str
    offset: int
    size: int


def zip_records(path: str, handle: BinaryIO, size: int | None = None) -> dict[str, Record]:
    """Every member of the zip with the absolute offset of its data; refuses compressed or out-of-file members.

    ``size`` is the file's size, for handles without a file descriptor (a remote file read by ranges).
    """
    file_size = os.fstat(handle.fileno()).st_size if size is None else size
    try:
        archive = zipfile.ZipFile(handle)
        infos = archive.infolist()
    except Exception as exc:  # zipfile raises many types on a malformed directory (BadZipFile, NotImplementedError, struct.error…)
        raise CheckpointError(path, f"not a readable zip archive ({exc}); truncated download?", code="zip-corrupt") from None
    records = {}
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                path, f"zip member {info.filename!r} is compressed; torch checkpoints store records uncompressed", code="zip-compressed"
            )
        handle.seek(info.header_offset)
        local = handle.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise CheckpointError(path, f"zip member {info.filename!r} has no local header at offset {info.header_offset}", code="zip-corrupt")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        offset = info.header_offset + 30 + name_len + extra_len
        if offset + info.file_size > file_size:
            raise CheckpointError(
                path, f"zip member {info.filename!r} runs past the end of the file (truncated?)", code="zip-truncated"
            )
        records[info.filename] = Record(info.filename, offset, info.file_size)
    return records


def read_torch_zip(path: str, handle: BinaryIO | None = None, size: int | None = None) -> tuple[FileInfo, list[TensorEntry]]:
    """Read a torch zip checkpoint's tensors without reading their data.

    Returns entries in the pickle's key order. Tensors with exactly the same bytes (tied weights) become aliases
    of the alphabetically first of their names, the name huggingface_hub keeps when it drops duplicates.
    """
    own = handle is None
    if own:
        handle = open(path, "rb")
    try:
        size = os.fstat(handle.fileno()).st_size if size is None else size
        records = zip_records(path, handle, size)
        prefix = _archive_prefix(path, records)
        byteorder = records.get(f"{prefix}byteorder")
        if byteorder is not None and _read(handle, byteorder) != b"little":
            raise CheckpointError(path, "checkpoint was saved big-endian; shardkit reads little-endian files only", code="big-endian")
        pkl = records[f"{prefix}data.pkl"]
        if pkl.size > MAX_PICKLE_SIZE:
            raise CheckpointError(path, f"data.pkl is {pkl.size} bytes, over the {MAX_PICKLE_SIZE}-byte limit", code="pickle-too-large")
        obj = RestrictedUnpickler(path, _read(handle, pkl), records, prefix).load()
    finally:
        if own:
            handle.close()

    state, skipped = _state_dict(path, obj)
    entries = _entries(path, state)
    info = FileInfo(path=path, format="torch-zip", size=size, tensors=[e.name for e in entries], skipped=skipped)
    return info, entries


def _read(handle: BinaryIO, record: Record) -> bytes:
    handle.seek(record.offset)
    return handle.read(record.size)


def _archive_prefix(path: str, records: dict[str, Record]) -> str:
    candidates = [name for name in records if name.endswith("data.pkl") and name.count("/") <= 1]
    if len(candidates) != 1:
        problem = "no data.pkl record" if not candidates else f"{len(candidates)} data.pkl records"
        raise CheckpointError(path, f"zip archive has {problem}; not a torch checkpoint", code="not-torch-zip")
    return candidates[0][: -len("data.pkl")]


# --- the restricted unpickler -----------------------------------------------------------------------------


class _Sealed:
    """Base of the objects a pickle can receive: BUILD (``__setstate__``) cannot rewrite them."""

    __slots__ = ()

    def __setstate__(self, state):
        raise TypeError(f"BUILD on {type(self).__name__} is not allowed")


class _StorageType(_Sealed):
    """Stands in for ``torch.FloatStorage`` and friends."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


class _Dtype(_Sealed):
    """Stands in for ``torch.float16`` and friends."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


class _StorageRef(_Sealed):
    __slots__ = ("storage",)

    def __init__(self, storage: Storage) -> None:
        self.storage = storage


class TensorRef(_Sealed):
    """What a tensor in ``data.pkl`` unpickles to: a view into a storage record, no data."""

    __slots__ = ("storage", "storage_offset", "shape", "stride", "dtype")

    def __init__(self, ref: _StorageRef, storage_offset, shape, stride, dtype: str) -> None:
        if not isinstance(ref, _StorageRef):
            raise TypeError("a tensor needs a storage")
        self.storage: Storage = ref.storage
        self.storage_offset = storage_offset
        self.shape = shape
        self.stride = stride
        self.dtype = dtype


class _ParameterMarker:
    """Stands in for ``torch.nn.Parameter``: a parameter is saved as its tensor."""

    def __new__(cls, data=None, requires_grad=True):
        return data


def _tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _StorageRef):
        raise TypeError("_rebuild_tensor_v2 needs a storage")
    return TensorRef(storage, storage_offset, size, stride, storage.storage.dtype)


def _tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(dtype, _Dtype):
        raise TypeError("_rebuild_tensor_v3 needs a dtype")
    return TensorRef(storage, storage_offset, size, stride, dtype.dtype)


def _parameter(data, requires_grad=True, backward_hooks=None, state=None):
    return data


def _from_type_v2(func, new_type, args, state):
    if func not in (_tensor_v2, _tensor_v3, _parameter) or new_type not in (_ParameterMarker, _TensorMarker):
        raise TypeError("unsupported tensor subclass")
    return func(*args)


class _TensorMarker:
    pass


def _encode_latin1(text, encoding="latin1"):
    # Protocol-2 pickles spell bytes as _codecs.encode(str, "latin1"); only that codec is allowed, so no codec
    # module is ever looked up.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise TypeError("only latin1 encoding is allowed")
    return text.encode("latin1")


def _device(spec="cpu", index=None):
    return str(spec) if index is None else f"{spec}:{index}"


def _allowed_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "slice"): slice,
        ("_codecs", "encode"): _encode_latin1,
        ("torch", "Size"): tuple,
        ("torch", "device"): _device,
        ("torch", "Tensor"): _TensorMarker,
        ("torch.nn.parameter", "Parameter"): _ParameterMarker,
        ("torch._utils", "_rebuild_tensor_v2"): _tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _from_type_v2,
        ("torch.storage", "UntypedStorage"): _StorageType("U8"),
        ("torch", "UntypedStorage"): _StorageType("U8"),
    }
    for cls, dtype in STORAGE_CLASSES.items():
        allowed[("torch", cls)] = _StorageType(dtype)
    for torch_name, dtype in FROM_TORCH_NAME.items():
        allowed[("torch", torch_name)] = _Dtype(dtype)
    return allowed


_ALLOWED = _allowed_globals()

# On torch's allow-list, but not tensors shardkit can copy as bytes: refused with a clear reason.
_UNSUPPORTED = {
    "_rebuild_qtensor": "a quantized tensor",
    "_rebuild_sparse_tensor": "a sparse tensor",
    "_rebuild_nested_tensor": "a nested tensor",
    "_rebuild_meta_tensor_no_storage": "a meta tensor without data",
    "_rebuild_wrapper_subclass": "a tensor subclass",
    "_rebuild_device_tensor_from_numpy": "a numpy-backed tensor",
    "_rebuild_device_tensor_from_cpu_tensor": "a device tensor",
}


class RestrictedUnpickler(pickle._Unpickler):
    """Unpickles ``data.pkl`` into plain containers and :class:`TensorRef` objects.

    ``find_class`` is the only way a pickle reaches a callable, and it returns only the stand-ins in
    ``_ALLOWED``; a ``__reduce__`` naming ``os.system`` or anything else ends the load with
    :class:`UnsafePickleError` before anything runs. The pure-Python unpickler is used so that BUILD can be
    restricted: ``model.state_dict()`` pickles its ``_metadata`` (module versions) as BUILD on the OrderedDict,
    which is accepted and dropped; BUILD on anything else is how a pickle would rewrite attributes of the
    stand-ins (a function's ``__code__``, say) for every later load in the process, and is refused.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def _load_build(self):
        state = self.stack.pop()
        target = self.stack[-1]
        if type(target) in (OrderedDict, dict) and isinstance(state, dict):
            return  # a state dict's _metadata: shardkit has no use for it
        raise UnsafePickleError(
            self._path, f"pickle uses BUILD to set the state of a {type(target).__name__}, which a state dict never needs; nothing was executed"
        )

    dispatch[pickle.BUILD[0]] = _load_build

    def __init__(self, path: str, data: bytes, records: dict[str, Record], prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self._path = path
        self._records = records
        self._prefix = prefix
        self._storages: dict[str, _StorageRef] = {}

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            pass
        if module == "torch._utils" and name in _UNSUPPORTED:
            raise CheckpointError(self._path, f"holds {_UNSUPPORTED[name]}, which shardkit does not support", code="unsupported-tensor")
        raise UnsafePickleError(
            self._path,
            f"pickle references {module}.{name}, which is not on the weights-only allow-list; nothing was executed",
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(self._path, f"unexpected persistent id {pid!r:.80}", code="pickle-invalid")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not _is_count(numel):
            raise CheckpointError(self._path, f"malformed storage reference {pid!r:.80}", code="pickle-invalid")
        if key in self._storages:
            return self._storages[key]
        record = self._records.get(f"{self._prefix}data/{key}")
        if record is None:
            raise CheckpointError(self._path, f"storage {key!r} has no data/{key} record in the archive", code="storage-missing")
        expected = numel * itemsize(storage_type.dtype)
        if record.size != expected:
            raise CheckpointError(
                self._path,
                f"storage {key!r} claims {numel} {storage_type.dtype} elements ({expected} bytes) but its record holds {record.size}",
                code="storage-size-mismatch",
            )
        storage = Storage(key=key, file=self._path, offset=record.offset, nbytes=record.size, dtype=storage_type.dtype)
        self._storages[key] = _StorageRef(storage)
        return self._storages[key]

    def load(self):
        try:
            return super().load()
        except CheckpointError:
            raise
        except RecursionError:
            raise CheckpointError(self._path, "data.pkl nests too deeply", code="pickle-invalid") from None
        except Exception as exc:  # any malformed pickle: opcodes, memo, types passed to stand-ins
            raise CheckpointError(self._path, f"data.pkl is not a valid torch pickle ({type(exc).__name__}: {exc})"[:300], code="pickle-invalid") from None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# --- from the unpickled object to table entries --------------------------------------------------------------


def _state_dict(path: str, obj: object) -> tuple[dict, dict[str, str]]:
    """The flat ``{name: TensorRef}`` mapping inside ``obj``, unwrapping common wrappers; other values reported."""
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"holds a {_describe(obj)}, not a state dict", code="not-a-state-dict")
    skipped: dict[str, str] = {}
    if not any(isinstance(v, TensorRef) for v in obj.values()):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, TensorRef) for v in inner.values()):
                skipped.update({f"{k}": f"{_describe(v)} beside the {key!r} state dict" for k, v in obj.items() if k != key})
                obj = inner
                break
    state = {}
    for name, value in obj.items():
        if not isinstance(name, str):
            skipped[repr(name)] = f"{_describe(value)} under a non-string key"
        elif isinstance(value, TensorRef):
            state[name] = value
        else:
            skipped[name] = _describe(value)
    if not state and obj:
        raise CheckpointError(path, f"holds no tensors (keys: {', '.join(map(str, list(obj)[:5]))})", code="not-a-state-dict")
    return state, skipped


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return f"dict of {len(value)} entries"
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)} items"
    return type(value).__name__


def _entries(path: str, state: dict[str, TensorRef]) -> list[TensorEntry]:
    canonical: dict[tuple, str] = {}
    for name in sorted(state):
        canonical.setdefault(_identity(state[name]), name)
    entries = []
    for name, ref in state.items():
        _check_view(path, name, ref)
        nbytes = nbytes_of(ref.dtype, ref.shape)
        contiguous = _is_contiguous(ref.shape, ref.stride)
        offset = ref.storage.offset + ref.storage_offset * itemsize(ref.dtype) if contiguous else None
        first = canonical[_identity(ref)]
        entries.append(
            TensorEntry(
                name=name,
                dtype=ref.dtype,
                shape=ref.shape,
                nbytes=nbytes,
                file=path,
                offset=offset,
                storage=ref.storage,
                storage_offset=ref.storage_offset,
                stride=ref.stride,
                alias_of=None if first == name else first,
            )
        )
    return entries


def _identity(ref: TensorRef) -> tuple:
    return (ref.storage.key, ref.storage_offset, ref.shape, ref.stride, ref.dtype)


def _check_view(path: str, name: str, ref: TensorRef) -> None:
    shape, stride = ref.shape, ref.stride
    valid = (
        isinstance(shape, tuple)
        and isinstance(stride, tuple)
        and len(shape) == len(stride)
        and all(_is_count(d) for d in shape)
        and all(_is_count(s) for s in stride)
        and _is_count(ref.storage_offset)
        and ref.dtype in DTYPE_BITS
    )
    if not valid:
        raise CheckpointError(path, f"tensor {name!r} has a malformed shape or stride", code="pickle-invalid")
    if nbytes_of(ref.dtype, shape) is None:
        raise CheckpointError(path, f"tensor {name!r}: {ref.dtype} {list(shape)} does not fill whole bytes", code="pickle-invalid")
    if math.prod(shape) == 0:
        return
    last = ref.storage_offset + sum((d - 1) * s for d, s in zip(shape, stride))
    if (last + 1) * itemsize(ref.dtype) > ref.storage.nbytes:
        raise CheckpointError(
            path,
            f"tensor {name!r} reaches past the end of its storage {ref.storage.key!r} ({ref.storage.nbytes} bytes)",
            code="storage-too-short",
        )


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """C-contiguous the way torch judges it: strides of size-1 dims don't matter, empty tensors always are."""
    if math.prod(shape) == 0:
        return True
    expected = 1
    for dim, step in zip(reversed(shape), reversed(stride)):
        if dim != 1 and step != expected:
            return False
        expected *= dim
    return True
