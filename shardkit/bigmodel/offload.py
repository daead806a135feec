"""The disk tier: where each offloaded tensor's bytes are, checked against the files before they are trusted.

A tensor mapped to ``"disk"`` is read at run time straight from a safetensors file: the original checkpoint
shard when it already holds the tensor in the right dtype (no second copy), otherwise a file written once into
the offload folder with the cast weights. ``shardkit-offload.json`` in that folder records every tensor's file,
offset, dtype and shape, and each file's size and header digest: a file changed or truncated since is refused
with a clear error instead of feeding garbage to the model.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from ..errors import CheckpointError, OutputError
from ..fileio import read_into
from ..formats.safetensors import build_header

INDEX_NAME = "shardkit-offload.json"
INDEX_FORMAT = "shardkit-offload/1"


@dataclass(frozen=True, slots=True)
class Stored:
    """``nbytes`` bytes of a ``dtype`` (safetensors name) tensor of ``shape`` at absolute ``offset`` in ``file``.

    A tensor assembled from several runs of bytes (MoE experts packed from per-expert tensors) lists them in
    ``pieces`` as ``(file, absolute offset, nbytes)``, in order; ``file`` and ``offset`` are then its first run's.
    """

    file: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    pieces: tuple[tuple[str, int, int], ...] = ()

    def locate(self, start: int, nbytes: int) -> list[tuple[str, int, int, int]]:
        """The file runs holding bytes ``[start, start + nbytes)`` of the tensor: ``(file, offset, nbytes, at)``,
        ``at`` being where each run's bytes begin relative to ``start``."""
        if not self.pieces:
            return [(self.file, self.offset + start, nbytes, 0)] if nbytes else []
        runs, position, end = [], 0, start + nbytes
        for file, offset, size in self.pieces:
            lo, hi = max(start, position), min(end, position + size)
            if lo < hi:
                runs.append((file, offset + lo - position, hi - lo, lo - start))
            position += size
            if position >= end:
                break
        return runs


def stamp(path: str) -> dict:
    """What a file must still look like for its offsets to hold: its size and a digest of its safetensors header."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        header = handle.read(min(length, size))
    return {"size": size, "header_sha256": hashlib.sha256(prefix + header).hexdigest()}


class OffloadStore(Mapping):
    """Disk-tier tensors by name, read with ``pread`` from files verified on open.

    A read-only ``Mapping`` of tensor name to a CPU tensor read on each access, as accelerate's
    ``OffloadedWeightsLoader`` is (``store[name]``, ``name in store``, ``len``, iteration over names, in the order
    they were stored); ``tensors`` holds where each one's bytes are. Equality is identity: comparing two stores
    never reads their tensors.
    """

    __hash__ = object.__hash__

    def __init__(self, tensors: dict[str, Stored], stamps: dict[str, dict], folder: str | None = None) -> None:
        self.tensors = tensors
        self.stamps = stamps
        self.folder = folder
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()  # reader threads open files concurrently
        self.verify()

    @classmethod
    def open(cls, folder: str | os.PathLike) -> OffloadStore:
        """The store an earlier load wrote into ``folder``; raises CheckpointError if it is missing or stale."""
        folder = os.fspath(folder)
        path = os.path.join(folder, INDEX_NAME)
        try:
            with open(path, "rb") as handle:
                data = orjson.loads(handle.read())
        except FileNotFoundError:
            raise CheckpointError(
                folder, f"holds no {INDEX_NAME}: load the checkpoint with this offload_folder first", code="offload-missing"
            ) from None
        except orjson.JSONDecodeError as exc:
            raise CheckpointError(path, f"is not valid JSON ({exc})", code="offload-changed") from None
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            raise CheckpointError(path, f"is not a {INDEX_FORMAT} index", code="offload-changed")
        resolve = lambda f: f if os.path.isabs(f) else os.path.join(folder, f)  # noqa: E731
        tensors = {
            name: Stored(
                resolve(t["file"]),
                t["offset"],
                t["nbytes"],
                t["dtype"],
                tuple(t["shape"]),
                tuple((resolve(f), o, n) for f, o, n in t.get("pieces", ())),
            )
            for name, t in data["tensors"].items()
        }
        stamps = {resolve(f): s for f, s in data["files"].items()}
        return cls(tensors, stamps, folder)

    def verify(self) -> None:
        """Raise CheckpointError naming the first file that is gone, or changed in size or header since recorded."""
        for path, expected in self.stamps.items():
            try:
                actual = stamp(path)
            except FileNotFoundError:
                raise CheckpointError(
                    path, "offloaded weights file is gone; load the checkpoint again", code="offload-changed"
                ) from None
            if actual["size"] != expected["size"]:
                raise CheckpointError(
                    path,
                    f"offloaded weights file is {actual['size']} bytes, {expected['size']} when offloaded "
                    "(changed or truncated since); load the checkpoint again",
                    code="offload-changed",
                )
            if actual["header_sha256"] != expected["header_sha256"]:
                raise CheckpointError(
                    path,
                    "offloaded weights file's header changed since it was offloaded; load the checkpoint again",
                    code="offload-changed",
                )

    def save(self) -> None:
        """Write the index into the folder atomically (paths inside the folder are stored relative)."""
        if self.folder is None:
            return
        os.makedirs(self.folder, exist_ok=True)
        folder = os.path.abspath(self.folder)

        def rel(f: str) -> str:
            return os.path.relpath(f, folder) if os.path.dirname(os.path.abspath(f)) == folder else f

        data = {
            "format": INDEX_FORMAT,
            "files": {rel(f): s for f, s in self.stamps.items()},
            "tensors": {
                n: {
                    "file": rel(t.file),
                    "offset": t.offset,
                    "nbytes": t.nbytes,
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    **({"pieces": [[rel(f), o, size] for f, o, size in t.pieces]} if t.pieces else {}),
                }
                for n, t in self.tensors.items()
            },
        }
        atomic_write(os.path.join(self.folder, INDEX_NAME), orjson.dumps(data, option=orjson.OPT_INDENT_2))

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def read_into(self, path: str, offset: int, dest: memoryview) -> None:
        """Fill ``dest`` from ``path`` at ``offset``; a short read means the file was truncated after it was checked."""
        read_into(self._fd(path), dest, offset, path, code="offload-changed")

    def runs(self, placement: dict[str, int]) -> list[tuple[str, int, int, int]]:
        """Reads that fill a slab: ``(file, file_offset, slab_offset, nbytes)`` for tensors at ``placement[name]``,
        merged wherever consecutive tensors are consecutive both in the file and in the slab."""
        pieces = sorted(
            (file, offset, at + within, nbytes)
            for n, at in placement.items()
            for file, offset, nbytes, within in self.tensors[n].locate(0, self.tensors[n].nbytes)
        )
        merged: list[list] = []
        for path, offset, at, nbytes in pieces:
            if nbytes == 0:
                continue
            last = merged[-1] if merged else None
            if last and last[0] == path and last[1] + last[3] == offset and last[2] + last[3] == at:
                last[3] += nbytes
            else:
                merged.append([path, offset, at, nbytes])
        return [tuple(m) for m in merged]

    def load(self, name: str):
        """Tensor ``name`` as a CPU tensor owning its memory."""
        import torch

        from ..dtypes import torch_dtype

        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        for file, offset, nbytes, at in info.locate(0, info.nbytes):
            self.read_into(file, offset, view[at : at + nbytes])
        return out

    def __getitem__(self, name: str):
        if name not in self.tensors:
            raise KeyError(name)
        return self.load(name)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __eq__(self, other: object) -> bool:
        return self is other

    def __repr__(self) -> str:
        return f"OffloadStore({len(self.tensors)} tensors, {len(self.stamps)} files, folder={self.folder!r})"

    def __deepcopy__(self, memo):
        return self  # read-only view of files: copies of a dispatched model share it

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class OffloadWriter:
    """Write one safetensors file of known tensors (``(name, dtype, shape, nbytes)`` in order) by streaming their bytes."""

    def __init__(self, path: str, specs: list[tuple[str, str, tuple[int, ...], int]]) -> None:
        self.path = path
        header = build_header(specs, {"format": "pt"})
        self.data_start = len(header)
        self.offsets, position = {}, self.data_start
        for name, _, _, nbytes in specs:
            self.offsets[name] = position
            position += nbytes
        self.specs = {name: (dtype, shape, nbytes) for name, dtype, shape, nbytes in specs}
        fd, self.tmp = tempfile.mkstemp(prefix=".offload-", dir=os.path.dirname(path))
        self.handle = os.fdopen(fd, "wb")
        self.handle.write(header)
        self.handle.flush()
        self.handle.truncate(position)

    def write_at(self, name: str, start: int, data) -> None:
        """Write ``data`` at byte ``start`` of tensor ``name``'s range (tensors may arrive in any order)."""
        view, done = memoryview(data).cast("B"), 0
        while done < len(view):
            done += os.pwrite(self.handle.fileno(), view[done:], self.offsets[name] + start + done)

    def finish(self) -> dict[str, Stored]:
        """Close, move into place atomically; the tensors now stored."""
        try:
            self.handle.close()
            os.replace(self.tmp, self.path)
        except OSError as exc:
            self.abort()
            raise OutputError(f"{self.path}: cannot write offloaded weights ({exc.strerror})") from None
        return {
            name: Stored(self.path, self.offsets[name], nbytes, dtype, shape)
            for name, (dtype, shape, nbytes) in self.specs.items()
        }

    def abort(self) -> None:
        self.handle.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def atomic_write(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise OutputError(f"{path}: cannot be written ({exc.strerror})") from None
