"""PyTorch zip checkpoints (``torch.save`` since 1.6): read ``data.pkl`` safely and locate every storage's bytes.

The archive holds ``<prefix>/data.pkl`` (the object, with storages as persistent ids), ``<prefix>/data/<key>``
(each storage's raw bytes, stored uncompressed) and ``<prefix>/byteorder``. shardkit reads the zip's central
directory and local headers to find each record's absolute offset, and unpickles ``data.pkl`` with
:class:`~shardkit.formats.unpickler.RestrictedUnpickler` (weights-only, nothing imported or called).
"""

from __future__ import annotations

import math
import os
import struct
import zipfile
from dataclasses import dataclass
from typing import BinaryIO

from ..dtypes import DTYPE_BITS, itemsize, nbytes_of
from ..errors import CheckpointError
from ..fileio import is_count
from ..table import FileInfo, TensorEntry
from .unpickler import RestrictedUnpickler, TensorRef

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
    except (
        Exception
    ) as exc:  # zipfile raises many types on a malformed directory (BadZipFile, NotImplementedError, struct.error…)
        raise CheckpointError(path, f"not a readable zip archive ({exc}); truncated download?", code="zip-corrupt") from None
    records = {}
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                path,
                f"zip member {info.filename!r} is compressed; torch checkpoints store records uncompressed",
                code="zip-compressed",
            )
        local = b""
        if 0 <= info.header_offset <= file_size - 30:  # a lying directory may point anywhere, even past seek()'s range
            handle.seek(info.header_offset)
            local = handle.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise CheckpointError(
                path, f"zip member {info.filename!r} has no local header at offset {info.header_offset}", code="zip-corrupt"
            )
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
    file = open(path, "rb") if handle is None else handle
    try:
        size = os.fstat(file.fileno()).st_size if size is None else size
        records = zip_records(path, file, size)
        prefix = _archive_prefix(path, records)
        byteorder = records.get(f"{prefix}byteorder")
        if byteorder is not None and _read(file, byteorder) != b"little":
            raise CheckpointError(
                path, "checkpoint was saved big-endian; shardkit reads little-endian files only", code="big-endian"
            )
        pkl = records[f"{prefix}data.pkl"]
        if pkl.size > MAX_PICKLE_SIZE:
            raise CheckpointError(
                path, f"data.pkl is {pkl.size} bytes, over the {MAX_PICKLE_SIZE}-byte limit", code="pickle-too-large"
            )
        obj = RestrictedUnpickler(path, _read(file, pkl), records, prefix).load()
    finally:
        if own:
            file.close()

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
        assert nbytes is not None  # _check_view refused a view that does not fill whole bytes
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
        and all(is_count(d) for d in shape)
        and all(is_count(s) for s in stride)
        and is_count(ref.storage_offset)
        and ref.dtype in DTYPE_BITS
    )
    if not valid:
        raise CheckpointError(path, f"tensor {name!r} has a malformed shape or stride", code="pickle-invalid")
    if nbytes_of(ref.dtype, shape) is None:
        raise CheckpointError(
            path, f"tensor {name!r}: {ref.dtype} {list(shape)} does not fill whole bytes", code="pickle-invalid"
        )
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
