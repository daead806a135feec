"""Re-read written files with shardkit's own reader and compare every tensor with its source.

The check is independent of the writer's bookkeeping: each output file's header (or ``data.pkl``) is parsed
afresh, every planned name must be there with the planned dtype and shape, aliases must share bytes, and each
tensor's bytes are compared with the source's, range to range through two bounded buffers (materialized
tensors are materialized again and compared in memory).
"""

from __future__ import annotations

import os
from typing import NoReturn

from ..errors import OutputError
from ..formats import open_file
from .assemble import assembled
from .byteio import BUFFER_SIZE, same_bytes
from .files import Sources, materialized_chunks
from .plan import Plan


def verify_plan(plan: Plan, folder: str, sources: Sources, progress=lambda n: None) -> None:
    """Raise :class:`OutputError` (``verify-failed``) unless the files of ``plan`` in ``folder`` hold exactly its tensors."""
    for planned in plan.files:
        path = os.path.join(folder, planned.name)
        _, entries = open_file(path)
        written = {e.name: e for e in entries}
        expected = {t.name for t in planned.tensors} if plan.format == "safetensors" else set(planned.keys)
        if set(written) != expected:
            missing, extra = sorted(expected - set(written)), sorted(set(written) - expected)
            _fail(planned.name, f"holds the wrong tensors (missing {missing[:3]}, unexpected {extra[:3]})")
        for name, stored in planned.keys.items():
            if name != stored and (written[name].storage, written[name].offset) != (
                written[stored].storage,
                written[stored].offset,
            ):
                _fail(planned.name, f"tensor {name!r} does not share its bytes with {stored!r}")
        out_fd = os.open(path, os.O_RDONLY)
        try:
            for tensor in planned.tensors:
                entry = written[tensor.name]
                if (entry.dtype, tuple(entry.shape), entry.nbytes) != (
                    tensor.dtype,
                    tensor.shape,
                    tensor.nbytes,
                ) or entry.offset is None:
                    _fail(
                        planned.name,
                        f"tensor {tensor.name!r} is {entry.dtype} {list(entry.shape)}, planned {tensor.dtype} "
                        f"{list(tensor.shape)}",
                    )
                ranges = tensor.ranges
                if tensor.materialize:
                    # The transform is recomputed from the source, one chunk at a time for computed tensors.
                    position, equal = entry.offset, True
                    for chunk in materialized_chunks(tensor, sources):
                        equal = equal and _equals_file(chunk, out_fd, position)
                        position += len(chunk)
                elif ranges is None:
                    position, equal = entry.offset, True
                    for piece in assembled(tensor.source, sources.fd):
                        equal = equal and _equals_file(piece, out_fd, position)
                        position += len(piece)
                else:
                    position, equal = entry.offset, True
                    for file, start, nbytes in ranges:
                        equal = equal and same_bytes(sources.fd(file), start, out_fd, position, nbytes, file, path)
                        position += nbytes
                if not equal:
                    _fail(
                        planned.name, f"tensor {tensor.name!r} differs from its source in {os.path.basename(tensor.source.file)}"
                    )
                progress(tensor.nbytes)
        finally:
            os.close(out_fd)


def _equals_file(data, fd: int, offset: int) -> bool:
    """Whether the file holds ``data`` at ``offset``, read one buffer at a time."""
    data = memoryview(data).cast("B")
    for start in range(0, len(data), BUFFER_SIZE):
        chunk = data[start : start + BUFFER_SIZE]
        if os.pread(fd, len(chunk), offset + start) != chunk.tobytes():
            return False
    return True


def _fail(file_name: str, problem: str) -> NoReturn:
    raise OutputError(f"verification failed: {file_name}: {problem}; nothing was written", code="verify-failed")
