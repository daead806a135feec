"""``--deep`` and ``--checksums``: read the tensor data itself.

Contiguous tensors are streamed in chunks of :data:`CHUNK` bytes (so memory stays bounded whatever a tensor's
size) through SHA-256 and, for floating-point dtypes, NaN/Inf/zero counts done by torch on each chunk. Views
into larger storages and legacy torch files are materialized one tensor at a time with
:func:`shardkit.materialize.load_tensor`. Checksums are per tensor over its C-order little-endian bytes, so a manifest
written before ``split`` or ``convert`` can be compared with the result; shared tensors (aliases) are listed once.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import orjson

from ..dtypes import FLOATING, itemsize, torch_dtype
from ..errors import CheckpointError, ShardkitError
from ..table import Checkpoint, TensorEntry
from .report import Report

CHUNK = 8 * 1024 * 1024
MANIFEST_FORMAT = "shardkit-checksums/1"

# Packed sub-byte floats have no NaN/Inf encoding torch can count on a byte buffer.
_NO_NAN_CHECK = {"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0"}


def check_data(
    checkpoint: Checkpoint,
    report: Report,
    *,
    nan_inf_zero: bool = True,
    checksums: str | os.PathLike | None = None,
    relative_to: str | os.PathLike | None = None,
) -> int:
    """Read every stored tensor of ``checkpoint``; record NaN/Inf/all-zero findings and handle the manifest.

    Returns how many tensors were read. A manifest is never written from nothing (no tensor read).
    """
    import torch  # --deep is the one validate path that needs tensors

    digests: dict[str, dict] = {}
    by_file: dict[str, list[TensorEntry]] = {}
    for entry in checkpoint.stored:
        by_file.setdefault(entry.file, []).append(entry)
    for path, entries in by_file.items():
        shown = os.path.relpath(path, relative_to) if relative_to else path
        try:
            handle = open(path, "rb")
        except OSError as exc:
            report.add("deep-skipped", f"cannot be opened to read tensor data ({exc.strerror}).", file=shown)
            continue
        with handle:
            for entry in sorted(entries, key=lambda e: e.offset if e.offset is not None else -1):
                try:
                    stats = _scan(torch, entry, handle)
                except CheckpointError as exc:
                    report.add(
                        exc.code if exc.code == "short-read" else "deep-skipped", f"{exc.problem}.", file=shown, tensor=entry.name
                    )
                    continue
                except ShardkitError as exc:  # a dtype this torch build cannot hold
                    report.add("deep-skipped", f"{exc}.", file=shown, tensor=entry.name)
                    continue
                digests[entry.name] = {"sha256": stats["sha256"], "dtype": entry.dtype, "shape": list(entry.shape)}
                if nan_inf_zero:
                    _report_stats(report, shown, entry, stats)
    if checksums and (digests or os.path.exists(checksums)):
        _manifest(report, os.fspath(checksums), digests)
    return len(digests)


def _scan(torch, entry: TensorEntry, handle) -> dict:
    """SHA-256 of the tensor's bytes and, for floats, its NaN, Inf and non-zero counts."""
    digest = hashlib.sha256()
    stats = {"nan": 0, "inf": 0, "nonzero": 0, "counted": entry.dtype in FLOATING and entry.dtype not in _NO_NAN_CHECK}
    if entry.offset is not None:
        step = max(itemsize(entry.dtype), CHUNK - CHUNK % itemsize(entry.dtype))
        handle.seek(entry.offset)
        remaining = entry.nbytes
        while remaining:
            chunk = handle.read(min(step, remaining))
            if not chunk or len(chunk) % itemsize(entry.dtype):  # the file shrank since its header was read
                raise CheckpointError(
                    entry.file,
                    f"file ends {remaining} bytes before the end of tensor {entry.name!r} (truncated?)",
                    code="short-read",
                )
            remaining -= len(chunk)
            digest.update(chunk)
            if stats["counted"]:
                _count(torch, torch.frombuffer(bytearray(chunk), dtype=torch.uint8).view(torch_dtype(entry.dtype)), stats)
    else:
        from ..materialize import load_tensor

        tensor = load_tensor(entry).contiguous()
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        if stats["counted"]:
            _count(torch, tensor.reshape(-1), stats)
    stats["sha256"] = digest.hexdigest()
    return stats


def _count(torch, values, stats: dict) -> None:
    if values.dtype.is_floating_point and values.element_size() == 1:
        values = values.float()  # float8 types: isnan/isinf are not implemented for them on every build
    stats["nan"] += int(torch.isnan(values).sum())
    stats["inf"] += int(torch.isinf(values).sum())
    stats["nonzero"] += int(torch.count_nonzero(values))


def _report_stats(report: Report, file: str, entry: TensorEntry, stats: dict) -> None:
    if not stats["counted"] or entry.numel == 0:
        return
    if stats["nan"]:
        report.add(
            "nan-values",
            f"{stats['nan']} of {entry.numel} values are NaN: the weights are corrupt or training diverged.",
            file=file,
            tensor=entry.name,
        )
    if stats["inf"]:
        report.add("inf-values", f"{stats['inf']} of {entry.numel} values are infinite.", file=file, tensor=entry.name)
    if not stats["nonzero"]:
        report.add(
            "all-zero", f"all {entry.numel} values are zero: check that this weight was saved.", file=file, tensor=entry.name
        )


def _manifest(report: Report, path: str, digests: dict[str, dict]) -> None:
    """Compare with the manifest at ``path`` if it exists, else write it (atomically)."""
    if not os.path.exists(path):
        data = {"format": MANIFEST_FORMAT, "algorithm": "sha256", "tensors": dict(sorted(digests.items()))}
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".checksums-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        report.checksums_written = path
        return
    try:
        with open(path, "rb") as handle:
            manifest = orjson.loads(handle.read())
        expected = manifest["tensors"]
        if manifest.get("algorithm", "sha256") != "sha256" or not isinstance(expected, dict):
            raise ValueError("not a sha256 manifest")
        expected = {str(k): str(v["sha256"]) for k, v in expected.items()}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        report.add("checksums-invalid", f"cannot be read as a shardkit checksum manifest ({exc}).", file=path)
        return
    for name, sha in expected.items():
        if name not in digests:
            report.add(
                "checksum-missing", "listed in the manifest but not in the checkpoint (or not readable).", file=path, tensor=name
            )
        elif digests[name]["sha256"] != sha:
            report.add("checksum-mismatch", "the tensor's bytes differ from the manifest's SHA-256.", file=path, tensor=name)
    for name in digests:
        if name not in expected:
            report.add("checksum-unlisted", "not in the manifest.", file=path, tensor=name)
    report.checksums_matched = sum(1 for name, sha in expected.items() if name in digests and digests[name]["sha256"] == sha)
