"""The restricted unpickler for ``data.pkl`` of torch zip checkpoints.

It admits a subset of what ``torch.load(weights_only=True)`` admits, and resolves every global to an inert
stand-in defined here: nothing is imported, nothing outside this module is called. Tensors unpickle to
:class:`TensorRef` (a view into a storage record, no data).
"""

from __future__ import annotations

import io
import pickle
import posixpath
from collections import OrderedDict
from typing import TYPE_CHECKING

from ..dtypes import FROM_TORCH_NAME, STORAGE_CLASSES, itemsize
from ..errors import CheckpointError, UnsafePickleError
from ..fileio import is_count
from ..table import Storage

if TYPE_CHECKING:
    from .torchzip import Record


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
            self._path,
            f"pickle uses BUILD to set the state of a {type(target).__name__}, which a state dict never needs; "
            "nothing was executed",
        )

    dispatch[pickle.BUILD[0]] = _load_build  # type: ignore[assignment]  # pickle's table is typed for its own methods

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
            raise CheckpointError(
                self._path, f"holds {_UNSUPPORTED[name]}, which shardkit does not support", code="unsupported-tensor"
            )
        raise UnsafePickleError(
            self._path,
            f"pickle references {module}.{name}, which is not on the weights-only allow-list; nothing was executed",
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(self._path, f"unexpected persistent id {pid!r:.80}", code="pickle-invalid")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not is_count(numel):
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
                f"storage {key!r} claims {numel} {storage_type.dtype} elements ({expected} bytes) "
                f"but its record holds {record.size}",
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
            raise CheckpointError(
                self._path, f"data.pkl is not a valid torch pickle ({type(exc).__name__}: {exc})"[:300], code="pickle-invalid"
            ) from None


# --- DCP ``.metadata``: torch.distributed.checkpoint's metadata classes as inert records -------------------------
#
# A separate allow-list, used only for ``.metadata`` files: the state-dict unpickler above admits none of these.
# Each class becomes a plain record that only BUILD (with a dict of its known fields, or TensorProperties' tuple)
# can fill; no method of the record runs on unpickling and nothing is imported.
#
# A ``.metadata`` holds one record per chunk (hundreds of kilobytes for a 7B model), so it is read with the C
# unpickler. It cannot restrict BUILD as the pure-Python one above does, so every object a pickle can reach is
# made safe against it instead: records fill themselves through ``__setstate__`` (known fields only) and refuse
# ``setattr``; the other stand-ins are sealed (``__setstate__`` raises, no ``__dict__``); the classes the pickle
# can name (the records and ``tuple``) cannot take attributes through BUILD either (a function called unbound,
# a read-only type). REDUCE and NEWOBJ can only call what ``find_class`` returns.


class DcpRecord:
    """Base of the stand-ins for DCP's metadata dataclasses: known fields only, unknown ones refused."""

    __slots__: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()

    def __init__(self) -> None:
        for name in self.__slots__:
            object.__setattr__(self, name, None)

    def fill(self, state: object) -> None:
        if not isinstance(state, dict) or not all(isinstance(k, str) and k in self.fields for k in state):
            raise TypeError(f"unexpected state for {type(self).__name__}")
        for key, value in state.items():
            object.__setattr__(self, key, value)

    def __setstate__(self, state: object) -> None:  # BUILD
        self.fill(state)

    def __getattr__(self, name: str):
        # A field the pickle never set (NEWOBJ does not run __init__) reads as None, like a dataclass default.
        if name in type(self).fields:
            return None
        raise AttributeError(name)

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{f}={getattr(self, f)!r}' for f in self.fields)})"


class DcpMetadata(DcpRecord):
    """``Metadata``: the tensor and bytes items of the state dict, and where each chunk is stored."""

    __slots__ = fields = ("state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version")


class DcpTensorMeta(DcpRecord):
    """``TensorStorageMetadata``: a tensor's properties, global size and chunks."""

    __slots__ = fields = ("properties", "size", "chunks")


class DcpBytesMeta(DcpRecord):
    """``BytesStorageMetadata``: a non-tensor item (pickled with ``torch.save``)."""

    __slots__ = fields = ()


class DcpChunkMeta(DcpRecord):
    """``ChunkStorageMetadata``: one block of a tensor, by its offsets and sizes in the global tensor."""

    __slots__ = fields = ("offsets", "sizes")


class DcpProperties(DcpRecord):
    """``TensorProperties``; torch pickles its state as ``(dtype, layout, requires_grad, memory format, pin_memory)``."""

    __slots__ = fields = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")

    def fill(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) == len(self.fields):
            state = dict(zip(self.fields, state))
        super().fill(state)


class DcpIndex(DcpRecord):
    """``MetadataIndex``: the key of a chunk in ``storage_data`` (fqn and chunk offsets; ``index`` is a hint)."""

    __slots__ = fields = ("fqn", "offset", "index")

    def key(self) -> tuple:
        return (self.fqn, self.offset)


class DcpStorageInfo(DcpRecord):
    """``_StorageInfo``: ``length`` bytes at ``offset`` in the file ``relative_path``."""

    __slots__ = fields = ("relative_path", "offset", "length", "transform_descriptors")


class DcpStorageMeta(DcpRecord):
    """``StorageMeta``: checkpoint and save ids (unused by shardkit)."""

    __slots__ = fields = ("checkpoint_id", "save_id", "load_id", "modules")


class _Function(_Sealed):
    """A stand-in function the pickle may call (REDUCE) but not rewrite (BUILD)."""

    __slots__ = ("_call",)

    def __init__(self, call) -> None:
        self._call = call

    def __call__(self, *args):
        return self._call(*args)


def _only_str(*parts):
    # PosixPath(checkpoint dir) and _get_layout("torch.strided") become their strings.
    if not parts or not all(isinstance(part, str) for part in parts):
        raise TypeError("expected strings")
    return posixpath.join(*parts)


def _int_code(value):
    # _MEM_FORMAT_ENCODING(0): an enum member by value, kept as the int.
    if not is_count(value):
        raise TypeError("expected an int")
    return value


_STRINGS, _INT_CODE = _Function(_only_str), _Function(_int_code)


def _dcp_allowed_globals() -> dict[tuple[str, str], object]:
    meta = "torch.distributed.checkpoint.metadata"
    allowed: dict[tuple[str, str], object] = {
        (meta, "Metadata"): DcpMetadata,
        (meta, "TensorStorageMetadata"): DcpTensorMeta,
        (meta, "BytesStorageMetadata"): DcpBytesMeta,
        (meta, "ChunkStorageMetadata"): DcpChunkMeta,
        (meta, "TensorProperties"): DcpProperties,
        (meta, "MetadataIndex"): DcpIndex,
        (meta, "StorageMeta"): DcpStorageMeta,
        (meta, "_MEM_FORMAT_ENCODING"): _INT_CODE,
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): DcpStorageInfo,
        ("torch.serialization", "_get_layout"): _STRINGS,
        ("torch", "Size"): tuple,
        ("pathlib", "PosixPath"): _STRINGS,
        ("pathlib", "WindowsPath"): _STRINGS,
        ("pathlib", "PurePosixPath"): _STRINGS,
        ("pathlib", "PureWindowsPath"): _STRINGS,
    }
    for torch_name, dtype in FROM_TORCH_NAME.items():
        allowed[("torch", torch_name)] = _Dtype(dtype)
    return allowed


_DCP_ALLOWED = _dcp_allowed_globals()


class DcpMetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` file into :class:`DcpRecord` stand-ins, plain containers and strings.

    Globals resolve only through ``_DCP_ALLOWED`` (see the comment above for why BUILD is safe here too).
    Persistent ids (there are none in ``.metadata``) are refused.
    """

    def __init__(self, path: str, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self._path = path

    def find_class(self, module: str, name: str):
        try:
            return _DCP_ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                self._path,
                f"pickle references {module}.{name}, which is not one of DCP's metadata classes; nothing was executed",
            ) from None

    def persistent_load(self, pid):
        raise CheckpointError(self._path, "DCP metadata holds a persistent id, which it never does", code="dcp-metadata-invalid")

    def load(self) -> DcpMetadata:
        try:
            result = super().load()
        except CheckpointError:
            raise
        except RecursionError:
            raise CheckpointError(self._path, "DCP metadata nests too deeply", code="dcp-metadata-invalid") from None
        except Exception as exc:
            raise CheckpointError(
                self._path, f"not a valid DCP metadata pickle ({type(exc).__name__}: {exc})"[:300], code="dcp-metadata-invalid"
            ) from None
        if not isinstance(result, DcpMetadata):
            raise CheckpointError(self._path, f"holds a {type(result).__name__}, not DCP Metadata", code="dcp-metadata-invalid")
        return result
