"""The safetensors header: parse it with the reference reader's rules, and build one for the writer.

Layout: ``[0, 8)`` header length N as u64 little-endian; ``[8, 8 + N)`` a UTF-8 JSON object, possibly padded with
spaces; ``[8 + N, EOF)`` tensor data. Each JSON entry is ``name: {dtype, shape, data_offsets: [begin, end)}``
relative to the data start; the optional ``__metadata__`` maps strings to strings. The data must be covered
exactly: sorted by offset, ranges start at 0, touch each other and end at EOF.
"""

from __future__ import annotations

import os
import struct
from typing import Any, BinaryIO

import orjson

from ..dtypes import SAFETENSORS_DTYPES, nbytes_of
from ..errors import CheckpointError
from ..fileio import is_count
from ..table import FileInfo, TensorEntry

#: The reference Rust reader refuses headers longer than this (``HeaderTooLarge``).
MAX_HEADER_SIZE = 100_000_000


def parse_header_length(path: str, prefix: bytes, file_size: int) -> int:
    """Check the first 8 bytes of a safetensors file and return N, the JSON header's length."""
    if file_size < 8 or len(prefix) < 8:
        raise CheckpointError(path, f"file is {file_size} bytes, too small for a safetensors header", code="sf-too-small")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_SIZE:
        raise CheckpointError(
            path,
            f"header length {length} exceeds the 100 MB limit (corrupt or not a safetensors file)",
            code="sf-header-too-large",
        )
    if 8 + length > file_size:
        raise CheckpointError(
            path,
            f"header of {length} bytes runs past the end of the {file_size}-byte file (truncated?)",
            code="sf-header-past-eof",
        )
    return length


def parse_header(
    path: str, raw: bytes, file_size: int, *, problems: list[CheckpointError] | None = None
) -> tuple[FileInfo, list[TensorEntry]] | None:
    """Validate a header's JSON (``raw`` = bytes ``[8, 8 + N)``) and return its file info and entries.

    Entries come in file order (by data offset), which is the order ``safetensors.torch.load_file`` yields.
    Raises :class:`CheckpointError` with a ``sf-*`` code on the first rule broken, unless ``problems`` is a list:
    then every rule broken is appended to it and parsing goes on as far as it can (see :func:`header_problems`).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _broken(
            problems, CheckpointError(path, f"header is not valid UTF-8 (byte {exc.start})", code="sf-header-not-utf8")
        )
    try:
        header = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return _broken(problems, CheckpointError(path, f"header is not valid JSON: {exc}", code="sf-header-json"))
    if not isinstance(header, dict):
        return _broken(problems, CheckpointError(path, "header is not a JSON object", code="sf-header-json"))

    metadata = header.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            _broken(problems, CheckpointError(path, "__metadata__ must map strings to strings", code="sf-bad-metadata"))
            metadata = None

    data_start = 8 + len(raw)
    parsed, spans = [], []  # spans: byte ranges for the coverage rule, those of broken entries included
    for name, info in header.items():
        try:
            dtype, shape, begin, end = _entry_fields(path, name, info)
        except CheckpointError as exc:
            _broken(problems, exc)
            spans += _usable_range(name, info)
            continue
        spans.append((begin, end, name))
        expected = nbytes_of(dtype, shape)
        if expected is None:
            _broken(
                problems,
                CheckpointError(
                    path, f"tensor {name!r}: {dtype} {list(shape)} does not fill whole bytes", code="sf-size-mismatch"
                ),
            )
            continue
        if end - begin != expected:
            _broken(
                problems,
                CheckpointError(
                    path,
                    f"tensor {name!r}: byte range [{begin}, {end}) holds {end - begin} bytes but {dtype} "
                    f"{list(shape)} needs {expected}",
                    code="sf-size-mismatch",
                ),
            )
            continue
        parsed.append((begin, end, name, dtype, shape))

    parsed.sort(key=lambda item: (item[0], item[1]))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            what = "leaves a gap before it" if begin > position else "overlaps the previous tensor"
            _broken(
                problems,
                CheckpointError(
                    path, f"tensor {name!r} starts at data offset {begin}, expected {position}: it {what}", code="sf-offsets"
                ),
            )
        position = end
    data_size = file_size - data_start
    if position != data_size:
        if position > data_size:
            problem = f"tensor data needs {position} bytes but the file holds {data_size} after the header (truncated?)"
            code = "sf-truncated"
        else:
            problem = f"{data_size - position} bytes after the last tensor that no tensor covers"
            code = "sf-trailing-bytes"
        _broken(problems, CheckpointError(path, problem, code=code))

    entries = [
        TensorEntry(name=name, dtype=dtype, shape=shape, nbytes=end - begin, file=path, offset=data_start + begin)
        for begin, end, name, dtype, shape in parsed
    ]
    info = FileInfo(
        path=path,
        format="safetensors",
        size=file_size,
        tensors=[e.name for e in entries],
        metadata=metadata,
        header_size=len(raw),
    )
    return info, entries


def header_problems(path: str, raw: bytes, file_size: int) -> list[CheckpointError]:
    """Every rule of the format the header ``raw`` breaks, in the order :func:`parse_header` checks them."""
    problems: list[CheckpointError] = []
    parse_header(path, raw, file_size, problems=problems)
    return problems


def _usable_range(name: str, info: object) -> list[tuple[int, int, str]]:
    """The byte range of an entry that broke another rule, if its offsets alone are sound."""
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o, 2**64) for o in offsets) and offsets[0] <= offsets[1]:
        return [(offsets[0], offsets[1], name)]
    return []


def _broken(problems: list[CheckpointError] | None, error: CheckpointError) -> Any:
    if problems is None:
        raise error
    problems.append(error)


def _entry_fields(path: str, name: str, info: object) -> tuple[str, tuple[int, ...], int, int]:
    if not isinstance(info, dict):
        raise CheckpointError(path, f"tensor {name!r}: entry is not an object", code="sf-bad-entry")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(path, f"tensor {name!r}: unknown dtype {dtype!r}", code="sf-unknown-dtype")
    if not isinstance(shape, list) or not all(is_count(d, 2**64) for d in shape):
        raise CheckpointError(
            path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers", code="sf-bad-entry"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_count(o, 2**64) for o in offsets)):
        raise CheckpointError(path, f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]", code="sf-bad-entry")
    begin, end = offsets
    if end < begin:
        raise CheckpointError(path, f"tensor {name!r}: data_offsets end {end} is before begin {begin}", code="sf-offsets")
    return dtype, tuple(shape), begin, end


def read_safetensors(path: str, handle: BinaryIO | None = None) -> tuple[FileInfo, list[TensorEntry]]:
    """Read and validate the header of the safetensors file at ``path``; never reads tensor data."""
    own = handle is None
    file = open(path, "rb") if handle is None else handle
    try:
        size = os.fstat(file.fileno()).st_size
        file.seek(0)
        length = parse_header_length(path, file.read(8), size)
        result = parse_header(path, file.read(length), size)
        assert result is not None  # without a problems list, a broken rule raises
        return result
    finally:
        if own:
            file.close()


def build_header(tensors: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str] | None) -> bytes:
    """Serialize a header for ``(name, dtype, shape, nbytes)`` laid out back to back in the given order.

    Returns the 8-byte length prefix plus the JSON, space-padded so that the data starts at a multiple of 8 (what
    the reference writer does, so every tensor of 8 bytes or less per element is naturally aligned).
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    position = 0
    for name, dtype, shape, nbytes in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + nbytes]}
        position += nbytes
    body = orjson.dumps(header)
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body
