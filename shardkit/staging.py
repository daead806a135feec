"""Atomic output folders: build everything in a hidden temporary folder beside DST, then move it into place.

A fresh DST appears in one ``rename`` of the finished, fsynced folder. An existing DST (``overwrite``) keeps its
other files (config, tokenizer): the old index goes first, then the new shards are moved in, the old layout's
stale shards removed, and the new index (or single file) moved in last, so no moment shows a checkpoint that
loads wrongly. A killed run leaves only the temporary folder, which the next run removes.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import UsageError

_TEMP_MARK = ".shardkit-tmp-"

#: Files that belong to a checkpoint layout shardkit writes: single files, shards and indexes.
_LAYOUT_RE = re.compile(r"^(?:model|pytorch_model)(?:-\d{5}-of-\d{5})?\.(?:safetensors|bin)(?:\.index\.json)?$")


class Staging:
    """Context manager owning the temporary folder for ``dst``; :meth:`commit` publishes it.

    Leaving the ``with`` block without a commit (an exception, Ctrl-C) removes the temporary folder.
    """

    def __init__(self, dst: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.dst = Path(os.path.abspath(os.fspath(dst)))
        self.overwrite = overwrite
        self.folder: Path | None = None
        check_destination(self.dst, overwrite)

    def __enter__(self) -> Staging:
        parent = self.dst.parent
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.dst)
        self.folder = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}{_TEMP_MARK}{os.getpid()}-", dir=parent))
        return self

    def __exit__(self, *exc) -> None:
        if self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder, ignore_errors=True)

    def commit(self, files: list[str], index: str | None) -> None:
        """Publish ``files`` (shards or one single file) and ``index`` from the staging folder into DST."""
        folder = self.folder
        _fsync_dir(folder)
        if not self.dst.exists() or (self.dst.is_dir() and not any(self.dst.iterdir())):
            os.replace(folder, self.dst)  # an empty DST directory is replaced atomically too
            self.folder = None
            _fsync_dir(self.dst.parent)
            return
        new = files + ([index] if index else [])
        old = [p for p in self.dst.iterdir() if _LAYOUT_RE.match(p.name)]
        for path in [p for p in old if p.name.endswith(".json")] + [p for p in old if not p.name.endswith(".json") and p.name not in new]:
            path.unlink()  # the old index first: from here on the old layout no longer looks loadable
        for name in new[:-1]:
            os.replace(folder / name, self.dst / name)
        _fsync_dir(self.dst)
        os.replace(folder / new[-1], self.dst / new[-1])  # the index (or single file) last
        _fsync_dir(self.dst)


def check_destination(dst: Path, overwrite: bool) -> None:
    """Refuse a DST that is a file, or a non-empty folder without ``overwrite``."""
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"{dst}: exists and is not a folder")
    if dst.is_dir() and not overwrite and any(dst.iterdir()):
        raise UsageError(f"{dst}: folder is not empty; pass --overwrite to replace the checkpoint in it")


def refuse_inside(dst: str | os.PathLike, source: str | os.PathLike, source_files: list[str]) -> None:
    """Refuse a DST that is, or lies inside, the source folder (or the folder of a single source file)."""
    target = os.path.realpath(dst)
    src = os.path.realpath(source)
    folder_like = os.path.isdir(src) or src.endswith(".json")
    root = src if os.path.isdir(src) else os.path.dirname(src)
    if target == root or (folder_like and target.startswith(root.rstrip(os.sep) + os.sep)):
        raise UsageError(f"{dst}: is the source checkpoint's folder or inside it; write somewhere else")
    for path in source_files:
        if target == os.path.dirname(os.path.realpath(path)):
            raise UsageError(f"{dst}: holds the source file {os.path.basename(path)}; write somewhere else")


def remove_stale(dst: Path) -> None:
    """Remove temporary folders left beside ``dst`` by killed runs (their process no longer exists)."""
    prefix = f".{dst.name}{_TEMP_MARK}"
    for path in dst.parent.glob(f"{prefix}*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

