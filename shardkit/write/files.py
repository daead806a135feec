"""Write the files of a :class:`~shardkit.write.plan.Plan`: byte ranges copied, only the unavoidable materialized.

A tensor whose source bytes are a list of byte runs in the output dtype (one run, or a DCP tensor's ``Shard(0)``
chunks) is copied file-to-file (:func:`shardkit.write.byteio.copy_range`), and runs that are adjacent in both
source and output are merged into one call. Other chunked tensors (``Shard(1)``, 2-D meshes) are assembled by
rows through a bounded buffer (:mod:`shardkit.write.assemble`), still without torch. Everything else (dtype casts,
non-contiguous views, legacy files) is materialized through torch one tensor at a time, so peak memory is one
copy buffer plus the largest such tensor (twice, across a cast).
"""

from __future__ import annotations

import ctypes
import functools
import os
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import CheckpointError
from ..fileio import write_all
from ..formats.safetensors import build_header
from ..formats.torchsave import PickledTensor, ZipWriter, state_dict_pickle
from .assemble import Bands, assembled
from .byteio import Writeback, copy_buffered, copy_range
from .derived import ComputedEntry, Reader
from .plan import Plan, PlannedFile, PlannedTensor, safetensors_order

Progress = Callable[[int], None]


class Sources:
    """Read-only descriptors of the source files, opened once and shared by every output file."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self.bands = Bands(2)  # for assembling chunked tensors (two: one being written, one being filled)

    def fd(self, path: str) -> int:
        if path not in self._fds:
            try:
                self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as exc:
                raise CheckpointError(
                    path, f"cannot be opened ({exc.strerror}); was it moved since it was read?", code="unreadable"
                ) from None
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Sources:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class WrittenFile:
    name: str
    size: int
    tensors: int


def write_plan(
    plan: Plan,
    folder: str,
    sources: Sources,
    progress: Progress = lambda n: None,
    after_file: Callable[[str], None] | None = None,
) -> list[WrittenFile]:
    """Write every file of ``plan`` into ``folder`` and its index last, all flushed to disk; return what was written.

    Files are fsynced together at the end so that writing one overlaps the writeback of the previous ones.
    """
    written = []
    for planned in plan.files:
        path = os.path.join(folder, planned.name)
        if plan.format == "safetensors":
            size = write_safetensors(path, planned, plan.file_metadata(), sources, progress)
        else:
            size = write_bin(path, planned, sources, progress)
        written.append(WrittenFile(planned.name, size, len(planned.tensors)))
        if after_file is not None:
            after_file(path)
    index_name = plan.index_name
    if plan.index is not None and index_name is not None:
        import json

        # huggingface_hub's exact bytes: json.dump(index, indent=2), no trailing newline.
        data = json.dumps(plan.index, indent=2).encode("utf-8")
        path = os.path.join(folder, index_name)
        fd = _create(path)
        try:
            write_all(fd, data, 0)
        finally:
            os.close(fd)
        written.append(WrittenFile(index_name, len(data), 0))
    for item in written:
        fd = os.open(os.path.join(folder, item.name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return written


def write_safetensors(path: str, planned: PlannedFile, metadata: dict | None, sources: Sources, progress: Progress) -> int:
    """One ``.safetensors`` file laid out like the reference writer (dtype rank, then name); returns its size."""
    tensors = safetensors_order(planned.tensors)
    header = build_header([(t.name, t.dtype, t.shape, t.nbytes) for t in tensors], metadata)
    fd = _create(path)
    try:
        write_all(fd, header, 0)
        position = len(header)
        run: list = []  # [source path, source start, source end, output start] of the pending merged copy

        writeback = Writeback(fd)

        def flush() -> None:
            if run:
                src, start, stop, out = run
                for piece in range(start, stop, Writeback.STEP):
                    count = min(Writeback.STEP, stop - piece)
                    copy_range(sources.fd(src), piece, fd, out + piece - start, count, src)
                    writeback.advance(out + piece - start + count)
                    progress(count)
            run.clear()

        for tensor in tensors:
            ranges = tensor.ranges
            if ranges is None:
                flush()
                if tensor.materialize:
                    _write_materialized(fd, position, tensor, sources)
                else:
                    _write_assembled(fd, position, tensor, sources, writeback)
                writeback.advance(position + tensor.nbytes)
                progress(tensor.nbytes)
                position += tensor.nbytes
                continue
            for file, start, count in ranges:
                if run and run[0] == file and run[2] == start:
                    run[2] += count
                else:
                    flush()
                    run[:] = [file, start, start + count, position]
                position += count
        flush()
        os.ftruncate(fd, position)
        return position
    finally:
        os.close(fd)


def write_bin(path: str, planned: PlannedFile, sources: Sources, progress: Progress) -> int:
    """One torch zip holding ``planned`` as an ``OrderedDict``; aliases share their tensor. Returns its size."""
    fd = _create(path)
    try:
        writeback = Writeback(fd)

        def write_tensor(tensor: PlannedTensor, offset: int) -> int:
            ranges = tensor.ranges
            crc: int
            if tensor.materialize:
                crc = _write_materialized(fd, offset, tensor, sources)
            elif ranges is None:
                crc = _write_assembled(fd, offset, tensor, sources, writeback, crc=True)
            else:  # through the buffer: the zip needs each record's CRC-32
                crc, at = 0, offset
                for file, start, length in ranges:
                    for piece in range(0, length, Writeback.STEP):
                        count = min(Writeback.STEP, length - piece)
                        crc = copy_buffered(sources.fd(file), start + piece, fd, at, count, file, crc=crc)
                        at += count
                        writeback.advance(at)
            progress(tensor.nbytes)
            return crc

        size = _write_zip(fd, planned, os.path.splitext(os.path.basename(path))[0], write_tensor)
        os.ftruncate(fd, size)
        return size
    finally:
        os.close(fd)


def _write_zip(fd: int, planned: PlannedFile, prefix: str, write_tensor: Callable[[PlannedTensor, int], int]) -> int:
    """The torch zip's records around each tensor's data (``write_tensor(tensor, offset)`` returns its CRC-32)."""
    keys = {t.name: str(i) for i, t in enumerate(planned.tensors)}
    by_name = {t.name: t for t in planned.tensors}
    pickled = {name: PickledTensor(t.dtype, t.shape, keys[name], t.nbytes) for name, t in by_name.items()}
    archive = ZipWriter(fd, prefix)
    archive.add("data.pkl", state_dict_pickle([(name, pickled[stored]) for name, stored in planned.keys.items()]))
    archive.add(".format_version", b"1")
    archive.add(".storage_alignment", b"64")
    archive.add("byteorder", b"little")
    for tensor in planned.tensors:
        offset = archive.begin(f"data/{keys[tensor.name]}", tensor.nbytes)
        archive.end(write_tensor(tensor, offset))
    archive.add("version", b"3\n")
    archive.add(".data/serialization_id", _serialization_id(planned))
    return archive.close()


def planned_size(planned: PlannedFile, fmt: str, metadata: dict | None) -> int:
    """The exact size of the file :func:`write_safetensors` or :func:`write_bin` will write (for ``--dry-run``)."""
    if fmt == "safetensors":
        tensors = safetensors_order(planned.tensors)
        return len(build_header([(t.name, t.dtype, t.shape, t.nbytes) for t in tensors], metadata)) + planned.nbytes
    fd = os.open(os.devnull, os.O_WRONLY)  # the zip's records, written nowhere: only their positions count
    try:
        return _write_zip(fd, planned, os.path.splitext(planned.name)[0], lambda tensor, offset: 0)
    finally:
        os.close(fd)


def materialize(tensor: PlannedTensor, sources: Sources):
    """The torch tensor for ``tensor`` in its output dtype, C-contiguous (imports torch)."""
    from ..dtypes import torch_dtype

    _return_large_blocks()
    source = tensor.source
    if isinstance(source, ComputedEntry):
        import torch

        data = bytearray()
        for chunk in source.compute(Reader(sources.fd), tensor.dtype):
            data += chunk
        return torch.frombuffer(data, dtype=torch.uint8).view(torch_dtype(tensor.dtype)).reshape(tensor.shape)
    value = Reader(sources.fd).tensor(source)
    if tensor.dtype != source.dtype:
        value = value.to(torch_dtype(tensor.dtype))
    return value.contiguous()


def materialized_chunks(tensor: PlannedTensor, sources: Sources):
    """The output bytes of ``tensor`` in bounded chunks: a computed tensor's recipe chunks, else the whole tensor."""
    if isinstance(tensor.source, ComputedEntry):
        _return_large_blocks()
        yield from tensor.source.compute(Reader(sources.fd), tensor.dtype)
    else:
        value = materialize(tensor, sources)
        yield tensor_bytes(value)


def tensor_bytes(value) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (valid while ``value`` lives); no numpy needed."""
    nbytes = value.numel() * value.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * nbytes).from_address(value.data_ptr())).cast("B")


def _write_materialized(fd: int, offset: int, tensor: PlannedTensor, sources: Sources) -> int:
    """Materialize ``tensor``, write its bytes at ``offset`` and return their CRC-32.

    A computed tensor is written chunk by chunk as its recipe yields them, never whole."""
    if isinstance(tensor.source, ComputedEntry):
        crc, position = 0, offset
        for chunk in materialized_chunks(tensor, sources):
            write_all(fd, chunk, position)
            crc = zlib.crc32(chunk, crc)
            position += len(chunk)
        if position - offset != tensor.nbytes:
            raise AssertionError(f"{tensor.name}: computed {position - offset} bytes, planned {tensor.nbytes}")
        return crc
    value = materialize(tensor, sources)
    data = tensor_bytes(value)
    if len(data) != tensor.nbytes:
        raise AssertionError(f"{tensor.name}: materialized {len(data)} bytes, planned {tensor.nbytes}")
    write_all(fd, data, offset)
    return zlib.crc32(data)


def _write_assembled(
    fd: int, offset: int, tensor: PlannedTensor, sources: Sources, writeback: Writeback, crc: bool = False
) -> int:
    """Assemble a chunked tensor band by band (no torch) and write it at ``offset``; return its CRC-32 if ``crc``.

    A writer thread writes each band while the next is assembled (two band buffers), so the row copies overlap
    the writes, which wait on the disk.
    """
    value = 0
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending = None
        for piece in assembled(tensor.source, sources.fd, bands=sources.bands):
            if pending is not None:
                pending.result()
                writeback.advance(offset)
            pending = writer.submit(write_all, fd, piece, offset)
            if crc:
                value = zlib.crc32(piece, value)
            offset += len(piece)
        if pending is not None:
            pending.result()
    return value


@functools.cache
def _return_large_blocks() -> None:
    """Have glibc serve blocks over 4 MiB with mmap and unmap them when freed.

    Otherwise its adaptive threshold moves large frees into the heap, where blocks of one tensor's size are not
    reused for the next one, and peak RSS grows by several tensors' worth (docs/performance.md, "Measured design
    choices").
    """
    try:
        ctypes.CDLL(None).mallopt(-3, 4 * 1024 * 1024)  # M_MMAP_THRESHOLD; fixing it disables the adaptation
    except (AttributeError, OSError):
        pass  # not glibc


def _serialization_id(planned: PlannedFile) -> bytes:
    # torch writes a random 40-digit id; a hash of the layout keeps shardkit's output deterministic.
    digest = zlib.crc32("\n".join(f"{n}:{planned.keys[n]}" for n in planned.keys).encode("utf-8"))
    return f"{digest:040d}".encode("ascii")


def _create(path: str) -> int:
    return os.open(
        path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666
    )  # the umask decides, as for any new file
