"""Atomic output folders: build everything in a hidden temporary folder beside DST, then move it into place.

A fresh DST appears in one ``rename`` of the finished, fsynced folder. An existing DST (``overwrite``) is
swapped whole: its other files (config, tokenizer, subfolders) are hard-linked (or copied) into the finished
folder, DST is renamed aside, the new folder renamed into its place, and the old one removed. At every moment
DST is the old checkpoint or the new one; a run killed between the two renames leaves the old folder aside,
and the next run puts it back before doing anything else. A killed run's temporary folder is removed by the
next run.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from ..errors import UsageError

_TEMP_MARK = ".shardkit-tmp-"
_OLD_MARK = ".shardkit-old-"

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

    def commit(self) -> None:
        """Publish the finished staging folder as DST (swapping out an existing DST, keeping its other files)."""
        folder = self.folder
        _fsync_dir(folder)
        if not self.dst.exists() or (self.dst.is_dir() and not any(self.dst.iterdir())):
            os.replace(folder, self.dst)  # an empty DST directory is replaced atomically too
            self.folder = None
            _fsync_dir(self.dst.parent)
            return
        _keep_other_files(self.dst, folder)
        _fsync_dir(folder)
        aside = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}{_OLD_MARK}{os.getpid()}-", dir=self.dst.parent))
        os.replace(self.dst, aside)  # an empty folder is replaced atomically
        os.replace(folder, self.dst)
        self.folder = None
        _fsync_dir(self.dst.parent)
        shutil.rmtree(aside, ignore_errors=True)


def _keep_other_files(dst: Path, folder: Path) -> None:
    """Put everything in ``dst`` that is not part of a checkpoint layout into ``folder``, by hard link where possible."""
    for path in dst.iterdir():
        if _LAYOUT_RE.match(path.name):
            continue
        target = folder / path.name
        if target.exists() or target.is_symlink():
            continue  # written by this run (a transformed config.json): the new one wins
        if path.is_symlink():
            os.symlink(os.readlink(path), target)
        elif path.is_dir():
            shutil.copytree(path, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(path, target)


def _link_or_copy(source, target) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


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
    """Clean up after killed runs (their process no longer exists): put back a DST left aside by an interrupted
    overwrite, remove their temporary and set-aside folders."""
    for mark in (_OLD_MARK, _TEMP_MARK):
        prefix = f".{dst.name}{mark}"
        for path in dst.parent.glob(f"{prefix}*"):
            pid = path.name[len(prefix) :].split("-", 1)[0]
            if not (pid.isdigit() and not _alive(int(pid)) and path.is_dir()):
                continue
            if mark == _OLD_MARK and not dst.exists():
                os.replace(path, dst)  # killed between the two renames of a swap: the old checkpoint comes back
            else:
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
