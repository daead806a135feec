"""Where a checkpoint's files may be: names from an index stay inside their folder; cache folders resolve to snapshots.

No reading of checkpoint content here: only path rules, shared by the reader, the validation checks, the Hub
side and DCP folders.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from .errors import CheckpointError, UnsafePathError


def resolve_in_folder(folder: Path, name: str, *, index_path: str) -> Path:
    """The file ``name`` (from an index) inside ``folder``; refuses names that could leave the folder.

    Absolute paths, drive letters and ``..`` are refused however they are spelled (Windows or POSIX). A symlink
    may only lead outside the folder into the blob store of the Hugging Face cache the folder belongs to.
    """
    check_relative_name(name, index_path=index_path)
    candidate = folder / name
    real, allowed = os.path.realpath(candidate), _allowed_roots(folder)
    if not any(real == root or real.startswith(root + os.sep) for root in allowed):
        raise UnsafePathError(index_path, f"{name!r} is a symlink to {real}, outside the checkpoint folder")
    return candidate


def check_relative_name(name: str, *, index_path: str) -> None:
    """Refuse a file name from an index that could leave its folder: absolute, drive letter or ``..``, any spelling."""
    windows, posix = PureWindowsPath(name), PurePosixPath(name)
    if not name or windows.is_absolute() or windows.drive or posix.is_absolute() or ".." in windows.parts or ".." in posix.parts:
        raise UnsafePathError(index_path, f"weight_map names {name!r}, which points outside the checkpoint folder")


def _allowed_roots(folder: Path) -> list[str]:
    """The folder itself and, inside a Hugging Face cache snapshot, the blob store of that one repo.

    ``<repo>/snapshots/<commit>/[sub/folders/]file -> ../../[../]blobs/<hash>``: a checkpoint in a subfolder of a
    snapshot (``text_encoder/``) links as far up as its repo's ``blobs/``, never to another repo's.
    """
    roots = [os.path.realpath(folder)]
    here = Path(os.path.abspath(folder))
    for snapshot in (here, *here.parents):  # the nearest <repo>/snapshots/<commit> at or above the folder
        if snapshot.parent.name == "snapshots" and (snapshot.parent.parent / "blobs").is_dir():
            roots.append(os.path.realpath(snapshot.parent.parent / "blobs"))
            break
    return roots


def resolve_cache_repo(folder: Path, revision: str) -> Path:
    """A ``models--org--name`` cache folder -> its snapshot folder for ``revision`` (a branch, tag or commit)."""
    snapshots = folder / "snapshots"
    if not folder.name.startswith(("models--", "datasets--", "spaces--")) or not snapshots.is_dir():
        return folder
    ref = folder / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = snapshots / commit
    if not snapshot.is_dir() and revision == "main" and not ref.exists():
        # Files fetched pinned to a commit leave no refs/main (shardkit 0.1, other tools): one snapshot is
        # unambiguous.
        only = [p for p in snapshots.iterdir() if p.is_dir()]
        if len(only) == 1:
            snapshot = only[0]
    if not snapshot.is_dir():
        raise CheckpointError(str(folder), f"cache holds no snapshot for revision {revision!r}", code="missing-file")
    return snapshot
