"""``--deep`` and ``--checksums``: read the tensor data itself.

``--checksums`` alone never imports torch for a tensor whose bytes are one run in the file (every safetensors
tensor, contiguous torch zip tensors): those bytes *are* its C-order bytes, hashed straight from the file by
:mod:`shardkit.hashing` (large reads, several tensors at once on threads). ``--deep`` streams each tensor in chunks
of :data:`CHUNK` bytes (memory bounded whatever a tensor's size) through SHA-256 and, for floating-point dtypes,
NaN/Inf/zero counts done by torch on each chunk. Views into larger storages and legacy torch files are
materialized one tensor at a time with :func:`shardkit.materialize.load_tensor` (torch) in both cases.

Checksums are per tensor over its C-order little-endian bytes, so a manifest
written before ``split`` or ``convert`` can be compared with the result; shared tensors (aliases) are listed once.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable

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
    progress: Callable[[int], object] | None = None,
) -> int:
    """Read every stored tensor of ``checkpoint``; record NaN/Inf/all-zero findings and handle the manifest.

    Returns how many tensors were read. A manifest is never written from nothing (no tensor read).

    ``progress`` is called with the number of bytes read as the work goes (from several threads).
    """
    digests: dict[str, dict] = {}
    readable: list[TensorEntry] = []
    for path, entries in _by_file(checkpoint.stored).items():
        try:
            with open(path, "rb"):
                readable += entries
        except OSError as exc:
            report.add("deep-skipped", f"cannot be opened to read tensor data ({exc.strerror}).", file=_shown(path, relative_to))
    if nan_inf_zero:
        _scan_all(readable, report, digests, relative_to, progress)
    else:
        _hash_all(readable, report, digests, relative_to, progress)
    if checksums and (digests or os.path.exists(checksums)):
        _manifest(report, os.fspath(checksums), digests)
    return len(digests)


def _by_file(entries) -> dict[str, list[TensorEntry]]:
    by_file: dict[str, list[TensorEntry]] = {}
    for entry in entries:
        by_file.setdefault(entry.file, []).append(entry)
    for group in by_file.values():
        group.sort(key=lambda e: e.offset if e.offset is not None else -1)
    return by_file


def _shown(path: str, relative_to) -> str:
    return os.path.relpath(path, relative_to) if relative_to else path


def _hash_all(entries: list[TensorEntry], report: Report, digests: dict, relative_to, progress) -> None:
    """SHA-256 of every tensor without torch where its bytes are one run: straight from the file, on threads."""
    from ..hashing import map_threads, sha256_file

    direct = [e for e in entries if e.offset is not None]

    def digest(entry: TensorEntry) -> str | Exception:
        try:
            return sha256_file(entry.file, start=entry.offset, length=entry.nbytes, progress=progress)
        except (OSError, CheckpointError) as exc:
            return exc

    # largest first, so that one big tensor does not finish alone at the end
    order = sorted(direct, key=lambda e: -e.nbytes)
    for entry, result in zip(order, map_threads(digest, order)):
        shown = _shown(entry.file, relative_to)
        if isinstance(result, CheckpointError) and result.code == "short-read":
            report.add(
                "short-read", f"file ends before the end of tensor {entry.name!r} (truncated?).", file=shown, tensor=entry.name
            )
        elif isinstance(result, Exception):
            report.add("deep-skipped", f"cannot be read ({result}).", file=shown, tensor=entry.name)
        else:
            digests[entry.name] = _record(entry, result, shown)
    others = [e for e in entries if e.offset is None]
    if others:  # views into larger storages and legacy files: through torch, one tensor at a time
        _scan_all(others, report, digests, relative_to, progress, nan_inf_zero=False)


def _record(entry: TensorEntry, sha256: str, shown: str) -> dict:
    return {"sha256": sha256, "dtype": entry.dtype, "shape": list(entry.shape), "file": shown}


def _scan_all(
    entries: list[TensorEntry], report: Report, digests: dict, relative_to, progress, *, nan_inf_zero: bool = True
) -> None:
    import torch  # counting NaN/Inf and materializing views are the validate paths that need tensors

    for path, group in _by_file(entries).items():
        shown = _shown(path, relative_to)
        with open(path, "rb") as handle:
            for entry in group:
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
                finally:
                    if progress is not None:
                        progress(entry.nbytes)
                digests[entry.name] = _record(entry, stats["sha256"], shown)
                if nan_inf_zero:
                    _report_stats(report, shown, entry, stats)


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
        tensors = {name: {k: v for k, v in row.items() if k != "file"} for name, row in sorted(digests.items())}
        data = {"format": MANIFEST_FORMAT, "algorithm": "sha256", "tensors": tensors}
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
            report.add(
                "checksum-mismatch",
                f"the tensor's bytes differ from the SHA-256 in the manifest {path}.",
                file=digests[name]["file"],
                tensor=name,
            )
    for name in digests:
        if name not in expected:
            report.add("checksum-unlisted", f"not in the manifest {path}.", file=digests[name]["file"], tensor=name)
    report.checksums_matched = sum(1 for name, sha in expected.items() if name in digests and digests[name]["sha256"] == sha)
