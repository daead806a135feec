"""The header-only checks: the index against the files it names, each file against the format's rules.

Nothing here stops at the first problem: each file is opened on its own, a file that can't be read becomes a
finding, and the cross-checks run over whatever could be read. The result is the checkpoint's table (for the
deep and model checks) or None when not even the index could be read.
"""

from __future__ import annotations

import os

from ..errors import CheckpointError, UnsafePathError
from ..naming import INDEX_RE, format_of_name
from ..reader import add_declared_aliases
from ..table import Checkpoint, FileInfo, IndexInfo, TensorEntry
from . import layout
from .report import Report

#: Findings listed one by one per file and code; beyond this, one more finding gives the count.
MAX_LISTED = 20


def check_checkpoint(
    source, selected: str, report: Report, *, whole_folder: bool = True, variant: str | None = None
) -> Checkpoint | None:
    """Check the checkpoint ``selected`` (an index or a file name) of ``source``; record findings in ``report``.

    ``whole_folder`` adds the checks that look at the folder's other files (stale shards, mixed formats).
    """
    listing = source.listing() if whole_folder else {}
    if whole_folder:
        try:
            source.check_path(selected)
        except UnsafePathError as exc:
            report.add(exc.code, f"{exc.problem}; it was not read.", file=selected)
            return None
    if INDEX_RE.match(os.path.basename(selected)):
        checkpoint = _check_sharded(source, selected, report)
    else:
        checkpoint = _check_single(source, selected, report)
    sharded_but_unread = checkpoint is None and INDEX_RE.match(os.path.basename(selected))
    if whole_folder and not sharded_but_unread:  # without the index, which shards are in use is unknown
        used = set(checkpoint.index.weight_map.values()) if checkpoint and checkpoint.index else {selected}
        layout.check_folder(listing, selected, used, report, variant)
    return checkpoint


def _check_single(source, name: str, report: Report) -> Checkpoint | None:
    opened = _open(source, name, report)
    if opened is None:
        return None
    info, entries = opened
    checkpoint = Checkpoint(source=source.label, format=info.format, entries={e.name: e for e in entries}, files=[info])
    add_declared_aliases(checkpoint, info.metadata or {})
    layout.check_file(name, info, entries, report)
    _count(checkpoint, report)
    return checkpoint


def _check_sharded(source, index_name: str, report: Report) -> Checkpoint | None:
    try:
        index = source.read_index(index_name)
    except CheckpointError as exc:
        report.add(exc.code, f"{exc.problem}.", file=index_name)
        return None
    weight_map = index.weight_map
    if not weight_map:
        report.add("index-empty", "weight_map is empty: the index describes no tensor.", file=index_name)
    _check_index_format(index_name, weight_map, report)

    folder = os.path.dirname(index_name)
    present: dict[str, str] = {}  # file name in the index -> name in the source
    for file_name in sorted(set(weight_map.values())):
        name = f"{folder}/{file_name}" if folder else file_name
        try:
            source.check_path(name)
        except UnsafePathError as exc:
            report.add(exc.code, f"{exc.problem}; it was not read.", file=file_name)
            continue
        if source.size(name) is None:
            count = sum(1 for v in weight_map.values() if v == file_name)
            report.add(
                "missing-shard",
                f"the index maps {count} tensor{'s' if count != 1 else ''} to this file, which is missing: download it again.",
                file=file_name,
            )
            continue
        present[file_name] = name
    source.prefetch(list(present.values()))  # a remote source overlaps its round trips; a local one ignores this
    opened: dict[str, tuple[FileInfo, list[TensorEntry]]] = {}
    for file_name, name in present.items():
        result = _open(source, name, report, shown=file_name)
        if result is not None:
            opened[file_name] = result
            layout.check_file(file_name, *result, report)

    checkpoint = _assemble(source, index, opened, report)
    unread = len(set(weight_map.values())) - len(opened)
    _check_total_size(index_name, index.metadata, checkpoint.total_bytes, unread, report)
    layout.check_numbering(index_name, sorted(set(weight_map.values())), report)
    _count(checkpoint, report)
    return checkpoint


def _count(checkpoint: Checkpoint, report: Report) -> None:
    stored = len(checkpoint.stored)
    report.tensors_checked, report.aliases_checked = stored, len(checkpoint) - stored


def _open(source, name: str, report: Report, *, shown: str | None = None):
    try:
        result = source.open_file(name)
    except CheckpointError as exc:
        problems = [exc]
        if exc.code.startswith("sf-"):  # a safetensors header: list every rule it breaks, not just the first
            try:
                problems = source.header_problems(name) or problems
            except CheckpointError:
                pass
        for problem in problems:
            report.add(problem.code, f"{problem.problem}.", file=shown or name)
        return None
    report.files_checked += 1
    return result


def _check_index_format(index_name: str, weight_map: dict[str, str], report: Report) -> None:
    expected = format_of_name(os.path.basename(index_name))
    if expected is None:
        return
    others = sorted({f for f in weight_map.values() if format_of_name(f) not in (expected, None)})
    if others:
        report.add(
            "index-format-mismatch",
            f"a {expected} index maps tensors to {', '.join(others[:3])}: rename the index or convert those files.",
            file=index_name,
        )


def _check_total_size(index_name: str, metadata: dict, actual: int, unread: int, report: Report) -> None:
    """``metadata.total_size`` against the tensors' bytes ``actual`` of the files read (``unread`` files were not).

    With files unread the sum is a lower bound: a total below it is still wrong, any other is not checked (and
    the report says so rather than staying silent).
    """
    total = metadata.get("total_size")
    if total is None or isinstance(total, bool) or not isinstance(total, (int, float)):
        report.add(
            "total-size-missing",
            "metadata.total_size is missing or not a number; some tools use it to plan memory.",
            file=index_name,
        )
    elif isinstance(total, float):
        what = f" (the tensors hold {actual} bytes)" if not unread else ""
        report.add(
            "total-size-float", f"metadata.total_size is the float {total}{what}; write the integer byte count.", file=index_name
        )
    elif not unread and total != actual:
        report.add(
            "total-size-mismatch",
            f"metadata.total_size is {total} but the tensors hold {actual} bytes (shared tensors counted once): fix the index.",
            file=index_name,
        )
    elif unread and total < actual:
        report.add(
            "total-size-mismatch",
            f"metadata.total_size is {total} but the files that could be read already hold {actual} bytes of tensors "
            f"({unread} file{'s' if unread != 1 else ''} unread): fix the index.",
            file=index_name,
        )
    elif unread:
        report.add(
            "total-size-unchecked",
            f"metadata.total_size ({total}) was not checked: {unread} file{'s' if unread != 1 else ''} could not be read, "
            f"the others hold {actual} bytes of tensors.",
            file=index_name,
        )


def _assemble(source, index: IndexInfo, opened: dict, report: Report) -> Checkpoint:
    """The table of everything readable, with index/header cross-checks recorded as findings."""
    checkpoint = Checkpoint(source=source.label, format="", entries={}, files=[], index=index)
    holders: dict[str, list[str]] = {}
    for file_name, (info, entries) in opened.items():
        checkpoint.files.append(info)
        for entry in entries:
            holders.setdefault(entry.name, []).append(file_name)
            checkpoint.entries.setdefault(entry.name, entry)
        duplicates = [e.name for e in entries if holders[e.name][0] != file_name]
        _add_many(
            report,
            "duplicate-tensor",
            file_name,
            duplicates,
            lambda t: f"also stored in {holders[t][0]}; loaders keep whichever they read last: delete one copy.",
        )
    formats = {info.format for info in checkpoint.files}
    checkpoint.format = formats.pop() if len(formats) == 1 else ("mixed" if formats else "")

    # Names that writers drop and declare as aliases (index metadata, shard __metadata__) are not missing.
    add_declared_aliases(checkpoint, index.metadata)
    for info in checkpoint.files:
        add_declared_aliases(checkpoint, info.metadata or {})

    missing: dict[str, list[str]] = {}
    for name, file_name in index.weight_map.items():
        entry = checkpoint.entries.get(name)
        declared_alias = entry is not None and name not in holders
        if file_name in opened and not declared_alias and file_name not in holders.get(name, ()):
            missing.setdefault(file_name, []).append(name)
    for file_name, names in sorted(missing.items()):
        _add_many(
            report,
            "index-key-missing",
            file_name,
            names,
            lambda t: (
                "the index maps this tensor to the file, but its header does not hold it"
                + (f" (it is in {holders[t][0]}: fix the index)" if t in holders else ": the weight is lost")
                + "."
            ),
        )
    for file_name, (_info, entries) in opened.items():
        unlisted = [e.name for e in entries if e.name not in index.weight_map]
        _add_many(
            report,
            "index-key-unlisted",
            file_name,
            unlisted,
            lambda t: (
                "the file holds this tensor but the index does not list it, so index-driven loaders skip it: "
                "add it to weight_map."
            ),
        )
    return checkpoint


def _add_many(report: Report, code: str, file_name: str, tensors: list[str], message) -> None:
    for tensor in tensors[:MAX_LISTED]:
        report.add(code, message(tensor), file=file_name, tensor=tensor)
    if len(tensors) > MAX_LISTED:
        report.add(code, f"... and {len(tensors) - MAX_LISTED} more tensors of this file with the same problem.", file=file_name)
