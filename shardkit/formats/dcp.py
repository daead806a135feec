"""torch.distributed.checkpoint (DCP) folders: ``.metadata`` plus ``__{rank}_{i}.distcp`` files, read without torch.

``.metadata`` is a pickle of DCP's ``Metadata``: for every state-dict key either a tensor (dtype, global size and
the chunks it was saved in, each a block given by offsets and sizes) or a bytes item, and for every chunk where
its bytes are (file, offset, length). shardkit unpickles it with
:class:`~shardkit.formats.unpickler.DcpMetadataUnpickler` (DCP's classes as inert records, nothing imported).

Each chunk is stored either as a whole ``torch.save`` zip (the default) whose ``data/0`` record holds the bytes,
or, with ``SerializationFormat.SAFETENSORS``, as a tensor of one safetensors blob per file that every item of the
file points at. Either way the table gets, per tensor, :class:`~shardkit.table.Chunk` objects with absolute byte
ranges; chunks must tile the tensor exactly once. Non-tensor items (step counters, scheduler and RNG state) are
listed in :attr:`~shardkit.table.FileInfo.skipped`, described through the weights-only unpickler at most.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import struct
from pathlib import Path
from typing import BinaryIO, cast

import orjson

from ..dtypes import DTYPE_BITS, itemsize, nbytes_of
from ..errors import CheckpointError, UnsafePickleError
from ..fileio import is_count
from ..table import Checkpoint, Chunk, FileInfo, TensorEntry
from .safetensors import parse_header, parse_header_length
from .torchzip import MAX_PICKLE_SIZE, Record, _archive_prefix, _check_view, _is_contiguous, zip_records
from .unpickler import (
    DcpBytesMeta,
    DcpChunkMeta,
    DcpIndex,
    DcpMetadata,
    DcpMetadataUnpickler,
    DcpStorageInfo,
    DcpTensorMeta,
    RestrictedUnpickler,
    TensorRef,
    _Dtype,
)

METADATA_NAME = ".metadata"

#: A ``.metadata`` pickle is kilobytes to tens of megabytes (one record per chunk); anything larger is refused unread.
MAX_METADATA_SIZE = 1024 * 1024 * 1024

#: Pairwise overlap checks are quadratic in a tensor's chunk count; above this only the element count is compared.
_PAIRWISE_LIMIT = 4096


def is_dcp(path: Path) -> bool:
    """Whether ``path`` is a DCP folder (it holds ``.metadata``) or a ``.metadata`` file."""
    return (path.is_dir() and (path / METADATA_NAME).is_file()) or (path.name == METADATA_NAME and path.is_file())


def read_dcp(source: str, path: Path, *, problems: list[CheckpointError] | None = None) -> Checkpoint:
    """The table of the DCP checkpoint at ``path`` (its folder or its ``.metadata`` file), from metadata alone.

    Reads ``.metadata`` and, per chunk, the small zip directory and ``data.pkl`` around its bytes (or the
    safetensors header of each file); never tensor data. Raises :class:`CheckpointError` naming the file, unless
    ``problems`` is a list: then each tensor or item that cannot be read is left out and its error appended
    (once per file for a file-level problem), and only an unreadable ``.metadata`` raises.
    """
    folder = dcp_folder(path)
    meta_path = folder / METADATA_NAME
    metadata = read_metadata(str(meta_path))
    reader = _ChunkReader(folder, str(meta_path))
    try:
        entries, skipped = _entries(reader, metadata, problems)
    finally:
        reader.close()
    files = []
    for rel in sorted(reader.sizes, key=_natural):
        full = str(folder / rel)
        files.append(
            FileInfo(
                path=full,
                format="dcp",
                size=reader.sizes[rel],
                tensors=reader.tensors.get(full, []),
                skipped=skipped.get(full, {}),
            )
        )
    planner = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    key_paths = {
        name: path
        for name, path in planner.items()
        if isinstance(name, str) and isinstance(path, tuple) and path and all(isinstance(p, (str, int)) for p in path)
    }
    return Checkpoint(source=source, format="dcp", entries=entries, files=files, root=str(folder), key_paths=key_paths)


def group_of(checkpoint: Checkpoint, name: str) -> str:
    """The top-level key of the nested state dict that ``name`` was saved under (``model``, ``optim``…); for a flat
    state dict, the first dotted component of the name."""
    path = checkpoint.key_paths.get(name, ())
    return str(path[0]) if len(path) > 1 else name.split(".", 1)[0]


def model_weights(checkpoint: Checkpoint) -> tuple[Checkpoint, str | None]:
    """What to write or load from ``checkpoint`` when the user chose nothing: for a DCP training state dict with a
    ``model`` group, only the model weights (see :func:`model_group`) and a note saying so; else all of it."""
    if checkpoint.format != "dcp":
        return checkpoint, None
    found = model_group(checkpoint)
    return (checkpoint, None) if found is None else found


def model_group(checkpoint: Checkpoint) -> tuple[Checkpoint, str] | None:
    """The model weights of a training state dict saved as ``{"model": ..., "optim": ...}``, and a note saying so.

    Returns None unless the state dict's top level has a ``model`` dict (a flat model state dict whose names
    merely start with ``model.`` does not count). The weights keep their names inside ``model``.
    """
    nested = [name for name, path in checkpoint.key_paths.items() if len(path) > 1 and path[0] == "model"]
    if not nested or not all(name.startswith("model.") for name in nested):
        return None
    kept: dict[str, TensorEntry] = {}
    left: dict[str, int] = {}
    for entry in checkpoint.stored:
        path = checkpoint.key_paths.get(entry.name, ())
        if len(path) > 1 and path[0] == "model":
            new = entry.name[len("model.") :]
            kept[new] = dataclasses.replace(entry, name=new)
        else:
            group = group_of(checkpoint, entry.name)
            left[group] = left.get(group, 0) + 1
    others = sum(len(info.skipped) for info in checkpoint.files)
    left_out = ", ".join(f"{group} ({count} tensors)" for group, count in left.items())
    if others:
        left_out += (", " if left_out else "") + f"{others} non-tensor item(s)"
    note = f"kept the {len(kept)} tensors of the state dict's 'model' group, named as inside it ('model.' stripped)" + (
        f"; left out: {left_out}" if left_out else ""
    )
    narrowed = dataclasses.replace(checkpoint, entries=kept, key_paths={})
    return narrowed, note


#: torch's ``HuggingFaceStorageWriter(save_distributed=True)``: each rank's chunks under plain names, no .metadata.
HF_SHARD_RE = re.compile(r"^shard-(\d{5})-model-(\d{5})-of-(\d{5})\.safetensors$")

#: Where that writer records each chunk's offsets in the global tensor (``__metadata__`` JSON).
SHARDING_KEY = "DCP_SHARDING_INFO"


def hf_shard_files(folder: Path) -> list[str]:
    """The ``shard-NNNNN-model-NNNNN-of-NNNNN.safetensors`` files of a folder (torch's distributed HF layout)."""
    return sorted((p.name for p in folder.iterdir() if HF_SHARD_RE.match(p.name)), key=_natural)


def read_hf_sharded(source: str, folder: Path, names: list[str]) -> Checkpoint:
    """The table of a folder written by torch's ``HuggingFaceStorageWriter(save_distributed=True)``.

    Each file holds one chunk of each of its tensors, at the offsets its ``__metadata__["DCP_SHARDING_INFO"]``
    gives; a tensor's global shape is where its chunks end (as torch's own reader infers it), and the chunks must
    tile it.
    """
    from ..paths import resolve_in_folder
    from .safetensors import read_safetensors

    files: list[FileInfo] = []
    pieces: dict[str, list[Chunk]] = {}
    for name in names:
        path = str(resolve_in_folder(folder, name, index_path=str(folder)))
        info, entries = read_safetensors(path)
        info.format = "dcp"
        files.append(info)
        try:
            sharding = orjson.loads((info.metadata or {})[SHARDING_KEY])
        except (KeyError, orjson.JSONDecodeError):
            raise CheckpointError(path, f"has no valid {SHARDING_KEY} in its __metadata__", code="dcp-metadata-invalid") from None
        for entry in entries:
            offsets = sharding.get(entry.name, {}).get("saved_offsets") if isinstance(sharding, dict) else None
            if not isinstance(offsets, list) or len(offsets) != len(entry.shape) or not all(is_count(o) for o in offsets):
                raise CheckpointError(
                    path, f"{SHARDING_KEY} gives no valid saved_offsets for {entry.name!r}", code="dcp-metadata-invalid"
                )
            pieces.setdefault(entry.name, []).append(Chunk(offsets=tuple(offsets), sizes=entry.shape, entry=entry))
    table: dict[str, TensorEntry] = {}
    for name, chunks in pieces.items():
        dtypes = {c.entry.dtype for c in chunks}
        if len(dtypes) != 1:
            raise CheckpointError(
                folder, f"tensor {name!r} has chunks of several dtypes {sorted(dtypes)}", code="dcp-chunk-mismatch"
            )
        shape = tuple(max(c.offsets[d] + c.sizes[d] for c in chunks) for d in range(len(chunks[0].sizes)))
        blocks = sorted({(c.offsets, c.sizes) for c in chunks})
        check_tiling(str(folder), name, shape, blocks)
        chunks.sort(key=lambda c: c.offsets)
        dtype = dtypes.pop()
        whole = [c for c in chunks if c.sizes == shape]
        base = whole[0].entry if len(whole) == 1 else None
        table[name] = TensorEntry(
            name=name,
            dtype=dtype,
            shape=shape,
            nbytes=nbytes_of(dtype, shape) or 0,
            file=base.file if base else next((c.entry.file for c in chunks if c.numel), chunks[0].entry.file),
            offset=base.offset if base else None,
            chunks=tuple(whole) if base else tuple(chunks),
        )
    return Checkpoint(source=source, format="dcp", entries=table, files=files, root=str(folder))


def dcp_folder(path: Path) -> Path:
    """The folder of a DCP checkpoint given as its folder or its ``.metadata`` file."""
    return path.parent if path.name == METADATA_NAME and not path.is_dir() else path


def read_metadata(path: str) -> DcpMetadata:
    """Unpickle a ``.metadata`` file with the DCP allow-list and check the shape of what it holds."""
    try:
        size = os.path.getsize(path)
        if size > MAX_METADATA_SIZE:
            raise CheckpointError(path, f"is {size} bytes, over the {MAX_METADATA_SIZE}-byte limit", code="dcp-metadata-invalid")
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise CheckpointError(path, "no such file: a DCP folder needs its .metadata", code="dcp-metadata-missing") from None
    except OSError as exc:
        raise CheckpointError(path, f"cannot be read ({exc.strerror})", code="unreadable") from None
    metadata = DcpMetadataUnpickler(path, data).load()
    items, storage = metadata.state_dict_metadata, metadata.storage_data
    if not isinstance(items, dict) or not all(isinstance(k, str) for k in items):
        raise CheckpointError(path, "state_dict_metadata is not a dict of names", code="dcp-metadata-invalid")
    if not isinstance(storage, dict) or not all(
        isinstance(k, DcpIndex) and isinstance(v, DcpStorageInfo) for k, v in storage.items()
    ):
        raise CheckpointError(path, "storage_data is not a map of chunk indexes to storage records", code="dcp-metadata-invalid")
    for name, item in items.items():
        if isinstance(item, DcpBytesMeta):
            continue
        if not isinstance(item, DcpTensorMeta) or not _valid_tensor_meta(item):
            raise CheckpointError(path, f"item {name!r} is not a well-formed tensor or bytes record", code="dcp-metadata-invalid")
    for key, info in storage.items():
        if not (
            isinstance(key.fqn, str)
            and (key.offset is None or _counts(key.offset))
            and isinstance(info.relative_path, str)
            and is_count(info.offset)
            and is_count(info.length)
        ):
            raise CheckpointError(path, f"storage record {key!r:.120} is malformed", code="dcp-metadata-invalid")
    return metadata


def _valid_tensor_meta(item: DcpTensorMeta) -> bool:
    properties = item.properties
    dtype = getattr(properties, "dtype", None)
    return (
        isinstance(dtype, _Dtype)
        and dtype.dtype in DTYPE_BITS
        and _counts(item.size)
        and isinstance(item.chunks, list)
        and all(
            isinstance(c, DcpChunkMeta) and _counts(c.offsets) and _counts(c.sizes) and len(c.offsets) == len(c.sizes)
            for c in item.chunks
        )
    )


def _counts(value: object) -> bool:
    return isinstance(value, tuple) and all(is_count(v) for v in value)


# --- from metadata to entries --------------------------------------------------------------------------------


def _entries(
    reader: _ChunkReader, metadata: DcpMetadata, problems: list[CheckpointError] | None
) -> tuple[dict[str, TensorEntry], dict[str, dict[str, str]]]:
    locations: dict[tuple, DcpStorageInfo] = {(key.fqn, key.offset): info for key, info in metadata.storage_data.items()}
    entries: dict[str, TensorEntry] = {}
    skipped: dict[str, dict[str, str]] = {}
    reported: set[tuple[str, str]] = set()  # file-level problems, reported once
    for name, item in metadata.state_dict_metadata.items():
        try:
            if isinstance(item, DcpBytesMeta):
                info = locations.get((name, None))
                if info is None:
                    raise CheckpointError(
                        reader.meta_path, f"bytes item {name!r} has no storage record", code="dcp-chunk-missing"
                    )
                file, description = reader.describe_bytes(name, info)
                skipped.setdefault(file, {})[name] = description
                continue
            entries[name] = _tensor_entry(reader, name, item, locations)
        except CheckpointError as exc:
            if problems is None:
                raise
            if exc.code in _FILE_LEVEL:
                if (exc.code, exc.path) in reported:
                    continue
                reported.add((exc.code, exc.path))
            problems.append(exc)
    return entries, skipped


#: Problems of a whole ``.distcp`` file, reported once rather than for every tensor with a chunk in it.
_FILE_LEVEL = frozenset({"dcp-file-missing", "unreadable", "path-escapes-folder"})


def _tensor_entry(reader: _ChunkReader, name: str, item: DcpTensorMeta, locations: dict) -> TensorEntry:
    dtype, shape = item.properties.dtype.dtype, tuple(item.size)
    nbytes = nbytes_of(dtype, shape)
    if nbytes is None:
        raise CheckpointError(
            reader.meta_path, f"tensor {name!r}: {dtype} {list(shape)} does not fill whole bytes", code="dcp-metadata-invalid"
        )
    blocks = sorted({(tuple(c.offsets), tuple(c.sizes)) for c in item.chunks})  # a replicated chunk is read once
    check_tiling(reader.meta_path, name, shape, blocks)
    chunks = []
    for offsets, sizes in blocks:
        info = locations.get((name, offsets))
        if info is None:
            raise CheckpointError(
                reader.meta_path, f"tensor {name!r}: chunk at {list(offsets)} has no storage record", code="dcp-chunk-missing"
            )
        chunks.append(Chunk(offsets=offsets, sizes=sizes, entry=reader.chunk(name, dtype, sizes, info)))
    whole = [c for c in chunks if c.sizes == shape]
    if len(whole) == 1:
        # One chunk is the whole tensor (replicated, or a plain tensor): an ordinary single-range entry.
        base = whole[0].entry
        return TensorEntry(
            name=name,
            dtype=dtype,
            shape=shape,
            nbytes=nbytes,
            file=base.file,
            offset=base.offset,
            storage=base.storage,
            storage_offset=base.storage_offset,
            stride=base.stride,
            chunks=(whole[0],),
        )
    first = next((c.entry.file for c in chunks if c.numel), chunks[0].entry.file if chunks else reader.meta_path)
    return TensorEntry(name=name, dtype=dtype, shape=shape, nbytes=nbytes, file=first, offset=None, chunks=tuple(chunks))


def check_tiling(path: str, name: str, shape: tuple[int, ...], blocks: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
    """Refuse chunks that leave a gap in the tensor ``shape``, overlap, or reach outside it.

    ``blocks`` are distinct ``(offsets, sizes)`` pairs. Empty chunks (a rank holding nothing) may sit anywhere up
    to the end of a dimension.
    """
    for offsets, sizes in blocks:
        if len(offsets) != len(shape) or any(o + s > d for o, s, d in zip(offsets, sizes, shape)):
            raise CheckpointError(
                path,
                f"tensor {name!r} {list(shape)}: chunk at {list(offsets)} of size {list(sizes)} reaches outside the tensor",
                code="dcp-chunk-out-of-bounds",
            )
    solid = [(o, s) for o, s in blocks if math.prod(s)]
    if len(solid) <= _PAIRWISE_LIMIT:
        for i, (a_off, a_size) in enumerate(solid):
            for b_off, b_size in solid[i + 1 :]:
                if all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in zip(a_off, a_size, b_off, b_size)):
                    raise CheckpointError(
                        path,
                        f"tensor {name!r}: chunks at {list(a_off)} and {list(b_off)} overlap",
                        code="dcp-chunk-overlap",
                    )
    covered = sum(math.prod(s) for _, s in solid)
    if covered != math.prod(shape):
        code = "dcp-chunk-gap" if covered < math.prod(shape) else "dcp-chunk-overlap"
        what = "leave a gap" if covered < math.prod(shape) else "overlap"
        raise CheckpointError(
            path,
            f"tensor {name!r} {list(shape)}: its chunks cover {covered} of {math.prod(shape)} elements, they {what}",
            code=code,
        )


# --- reading chunk records -----------------------------------------------------------------------------------


class _Window(io.RawIOBase):
    """Bytes ``[start, start + length)`` of an open file as a seekable file of its own (for :mod:`zipfile`)."""

    def __init__(self, handle: BinaryIO, start: int, length: int) -> None:
        self._handle, self._start, self._length, self._pos = handle, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self._length - self._pos))
        data = os.pread(self._handle.fileno(), count, self._start + self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


class _ChunkReader:
    """Opens each ``.distcp`` file once and locates chunk bytes in it."""

    def __init__(self, folder: Path, meta_path: str) -> None:
        self.folder = folder
        self.meta_path = meta_path
        self.sizes: dict[str, int] = {}  # relative path -> size
        self.tensors: dict[str, list[str]] = {}  # full path -> tensor names with a chunk there
        self._handles: dict[str, BinaryIO] = {}
        self._blobs: dict[tuple[str, int], dict[str, TensorEntry]] = {}
        self._pickles: dict[tuple, object] = {}

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()

    def _open(self, name: str, info: DcpStorageInfo) -> tuple[str, BinaryIO]:
        from ..paths import resolve_in_folder

        rel = info.relative_path
        if rel not in self._handles:
            found = resolve_in_folder(self.folder, rel, index_path=self.meta_path)
            try:
                handle = open(found, "rb")
            except FileNotFoundError:
                raise CheckpointError(
                    str(found), f"is missing: .metadata stores {name!r} there", code="dcp-file-missing"
                ) from None
            except OSError as exc:
                raise CheckpointError(str(found), f"cannot be opened ({exc.strerror})", code="unreadable") from None
            self._handles[rel] = handle
            self.sizes[rel] = os.fstat(handle.fileno()).st_size
        path = str(self.folder / rel)
        if info.transform_descriptors:
            raise CheckpointError(
                path,
                f"{name!r} is stored through the stream transforms {list(info.transform_descriptors)} (compression?), "
                "which shardkit does not read",
                code="dcp-transformed",
            )
        if info.offset + info.length > self.sizes[rel]:
            raise CheckpointError(
                path,
                f"{name!r} is stored at bytes [{info.offset}, {info.offset + info.length}) but the file has "
                f"{self.sizes[rel]} (truncated?)",
                code="dcp-truncated",
            )
        return path, self._handles[rel]

    def chunk(self, name: str, dtype: str, sizes: tuple[int, ...], info: DcpStorageInfo) -> TensorEntry:
        path, handle = self._open(name, info)
        listed = self.tensors.setdefault(path, [])
        if not listed or listed[-1] != name:
            listed.append(name)
        head = os.pread(handle.fileno(), 4, info.offset)
        if head == b"PK\x03\x04":
            entry = self._torch_save_chunk(path, handle, name, info)
        else:
            entry = self._safetensors_chunk(path, handle, name, info)
        if entry.dtype != dtype or entry.shape != sizes:
            raise CheckpointError(
                path,
                f"chunk of {name!r} at bytes {info.offset} holds {entry.dtype} {list(entry.shape)}, but .metadata says "
                f"{dtype} {list(sizes)}",
                code="dcp-chunk-mismatch",
            )
        return entry

    def _torch_save_chunk(self, path: str, handle: BinaryIO, name: str, info: DcpStorageInfo) -> TensorEntry:
        ref = self._torch_save(path, handle, name, info)
        if not isinstance(ref, TensorRef):
            raise CheckpointError(path, f"chunk of {name!r} at byte {info.offset} holds no tensor", code="dcp-chunk-invalid")
        _check_view(path, name, ref)
        contiguous = _is_contiguous(ref.shape, ref.stride)
        storage = dataclasses.replace(ref.storage, file=path, offset=info.offset + ref.storage.offset)
        return TensorEntry(
            name=name,
            dtype=ref.dtype,
            shape=tuple(ref.shape),
            nbytes=nbytes_of(ref.dtype, ref.shape) or 0,
            file=path,
            offset=storage.offset + ref.storage_offset * itemsize(ref.dtype) if contiguous else None,
            storage=storage,
            storage_offset=ref.storage_offset,
            stride=tuple(ref.stride),
        )

    def _torch_save(self, path: str, handle: BinaryIO, name: str, info: DcpStorageInfo) -> object:
        """Unpickle the ``torch.save`` zip at ``info`` with the weights-only allow-list.

        A tensor comes back with its storage record's offset relative to the chunk (see :meth:`_torch_save_chunk`).
        Chunks of equal shape have byte-identical archives but for their data: each distinct ``data.pkl`` and
        record layout is unpickled once.
        """
        where = f"{name!r} at bytes [{info.offset}, {info.offset + info.length})"
        span = _Span(handle.fileno(), info.offset, info.length)
        try:
            records = _fast_records(span)
            if records is None:  # anything unusual: the general zip reader, with its precise errors
                window = cast(BinaryIO, _Window(handle, info.offset, info.length))  # a file object zipfile can seek
                records = zip_records(path, window, info.length)
            prefix = _archive_prefix(path, records)
        except CheckpointError as exc:
            raise CheckpointError(path, f"{where}: {exc.problem}", code=exc.code) from None
        byteorder = records.get(f"{prefix}byteorder")
        if byteorder is not None and span.read(byteorder.offset, byteorder.size) != b"little":
            raise CheckpointError(path, f"{where} was saved big-endian; shardkit reads little-endian only", code="big-endian")
        pkl = records[f"{prefix}data.pkl"]
        if pkl.size > MAX_PICKLE_SIZE:
            raise CheckpointError(path, f"{where}: data.pkl is {pkl.size} bytes, over the limit", code="pickle-too-large")
        data = span.read(pkl.offset, pkl.size)
        key = (data, prefix, tuple(sorted(records.values(), key=lambda r: r.name)))
        if key not in self._pickles:
            try:
                self._pickles[key] = RestrictedUnpickler(path, data, records, prefix).load()
            except CheckpointError as exc:
                raise type(exc)(path, f"{where}: {exc.problem}", code=exc.code) from None
        return self._pickles[key]

    def _safetensors_chunk(self, path: str, handle: BinaryIO, name: str, info: DcpStorageInfo) -> TensorEntry:
        key = (path, info.offset)
        if key not in self._blobs:
            size = os.fstat(handle.fileno()).st_size - info.offset
            try:
                length = parse_header_length(path, os.pread(handle.fileno(), 8, info.offset), size)
                raw = os.pread(handle.fileno(), length, info.offset + 8)
                parsed = parse_header(path, raw, size)
            except CheckpointError as exc:
                raise CheckpointError(
                    path,
                    f"{name!r} at byte {info.offset} is neither a torch.save zip nor a safetensors blob ({exc.problem})",
                    code="dcp-chunk-invalid",
                ) from None
            assert parsed is not None
            self._blobs[key] = {
                e.name: TensorEntry(
                    name=e.name, dtype=e.dtype, shape=e.shape, nbytes=e.nbytes, file=path, offset=info.offset + e.offset
                )
                for e in parsed[1]
            }
        entry = self._blobs[key].get(name)
        if entry is None:
            raise CheckpointError(
                path, f"the safetensors blob at byte {info.offset} holds no tensor {name!r}", code="storage-missing"
            )
        return entry

    def describe_bytes(self, name: str, info: DcpStorageInfo) -> tuple[str, str]:
        """``(file, description)`` of a bytes item: what the weights-only unpickler sees in it, never more."""
        path, handle = self._open(name, info)
        if os.pread(handle.fileno(), 4, info.offset) != b"PK\x03\x04":
            return path, f"raw bytes ({info.length} B)"
        try:
            value = self._torch_save(path, handle, name, info)
        except UnsafePickleError:
            return path, f"pickled object ({info.length} B; outside the weights-only allow-list, not read)"
        except CheckpointError as exc:
            return path, f"unreadable pickled object ({exc.problem})"
        if isinstance(value, (int, float, bool, str)) and len(repr(value)) <= 40:
            return path, f"{type(value).__name__} {value!r}"
        return path, f"pickled {type(value).__name__} ({info.length} B)"


class _Span:
    """Reads inside one chunk's ``[start, start + length)``, its first and last few KiB read once (where a torch.save
    archive keeps its local headers, ``data.pkl`` and its zip directory)."""

    EDGE = 4096

    def __init__(self, fd: int, start: int, length: int) -> None:
        self.fd, self.start, self.length = fd, start, length
        self.head = os.pread(fd, min(length, self.EDGE), start)
        self.tail_start = max(0, length - self.EDGE)
        self.tail = (
            self.head[self.tail_start :] if self.tail_start < len(self.head) else os.pread(fd, self.EDGE, start + self.tail_start)
        )

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` in the chunk (fewer at its end)."""
        size = max(0, min(size, self.length - offset))
        if offset + size <= len(self.head):
            return self.head[offset : offset + size]
        if offset >= self.tail_start:
            return self.tail[offset - self.tail_start : offset - self.tail_start + size]
        return os.pread(self.fd, size, self.start + offset)


def _fast_records(span: _Span) -> dict[str, Record] | None:
    """The members of a plain stored zip (torch's layout) with offsets relative to the chunk, or None for anything
    else (a comment, compression, zip64 member fields, bounds that do not hold): :func:`zip_records` decides then."""
    tail = span.tail
    if len(tail) < 22 or tail[-22:-18] != b"PK\x05\x06" or tail[-2:] != b"\x00\x00":
        return None
    count, cd_size, cd_offset = struct.unpack("<HII", tail[-12:-2])
    if 0xFFFF in (count,) or 0xFFFFFFFF in (cd_size, cd_offset):
        if len(tail) < 42 or tail[-42:-38] != b"PK\x06\x07":
            return None
        (z64,) = struct.unpack("<Q", tail[-34:-26])
        record = span.read(z64, 56)
        if len(record) < 56 or record[:4] != b"PK\x06\x06":
            return None
        count, cd_size, cd_offset = struct.unpack("<QQQ", record[32:56])
    if cd_offset + cd_size > span.length or count > 64:
        return None
    directory = span.read(cd_offset, cd_size)
    records, position = {}, 0
    for _ in range(count):
        fixed = directory[position : position + 46]
        if len(fixed) < 46 or fixed[:4] != b"PK\x01\x02":
            return None
        method, size_c, size_u, name_len, extra_len, comment_len = struct.unpack("<H8xII3H", fixed[10:34])
        (local,) = struct.unpack("<I", fixed[42:46])
        name = directory[position + 46 : position + 46 + name_len]
        position += 46 + name_len + extra_len + comment_len
        if method != 0 or size_c != size_u or 0xFFFFFFFF in (size_u, local) or len(name) != name_len:
            return None
        header = span.read(local, 30)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            return None
        skip_name, skip_extra = struct.unpack("<HH", header[26:30])
        data = local + 30 + skip_name + skip_extra
        if data + size_u > span.length:
            return None
        try:
            text = name.decode("utf-8")
        except UnicodeDecodeError:
            return None
        records[text] = Record(text, data, size_u)
    return records


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
