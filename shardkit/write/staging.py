"""Atomic output folders: build everything in a hidden temporary folder, then move it into place.

Three cases, decided when the output is published (:meth:`Staging.commit`):

- **DST does not exist.** The temporary folder ``.DST.shardkit-tmp-PID-*`` is made beside DST with ``mkdir``'s
  mode under the user's umask (and the parent's set-group-id bit and default ACL, as any ``mkdir`` would), then
  renamed to DST in one step: DST appears whole or not at all.
- **DST is an empty folder** (``shardkit split SRC .``, an empty mount point). The temporary folder
  ``DST/.shardkit-fill-PID-*`` is made inside DST, so its files are on DST's file system and get DST's group; at
  the end its entries are moved into DST, index last. DST itself is kept (same inode, mode, owner, group), so a
  shell whose current folder it is stays in it. Until the index arrives DST holds no index; a run killed during
  the moves is undone by the next run (its journal lists what it moved), leaving DST empty again.
- **DST is a non-empty folder and ``overwrite``.** The temporary folder is made beside DST and given DST's mode,
  group, owner (where the user may set them: root may; others keep their own uid) and ACLs; DST's other files
  (config, tokenizer, subfolders) are hard-linked (or copied) into it; then DST is renamed aside, the new folder
  renamed into its place, and the old one removed. At every moment DST is the old checkpoint or the new one. The
  price of that guarantee is a new folder (a new inode): processes inside the old DST (a shell's current folder)
  keep the deleted old one. A run killed between the two renames leaves the old folder aside, and the next run
  puts it back before doing anything else.

Temporary folders of runs that no longer exist (SIGKILL, power loss) are removed by the next run that writes into
the same parent folder, whatever its DST. A folder is stale when the PID in its name is gone and no process holds
the lock on it (the lock also protects the live runs of other machines on a shared file system).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import stat
from pathlib import Path

from ..errors import UsageError
from ..naming import is_layout_name

_TEMP_MARK = ".shardkit-tmp-"
_OLD_MARK = ".shardkit-old-"
_FILL_MARK = ".shardkit-fill-"
_JOURNAL = ".shardkit-moved"

#: Our temporary folders: ``.DST.shardkit-tmp-PID-x`` and ``.DST.shardkit-old-PID-x`` beside DST, ``.shardkit-fill-PID-x`` in it.
_STALE_RE = re.compile(r"^\.(?:(?P<name>.+)\.)?shardkit-(?P<kind>tmp|old|fill)-(?P<pid>\d+)-[0-9a-z_]+$")

#: ACLs travel with the folder identity on an overwrite (Linux extended attributes).
_ACL_XATTRS = ("system.posix_acl_access", "system.posix_acl_default")


class Staging:
    """Context manager owning the temporary folder for ``dst``; :meth:`commit` publishes it.

    Leaving the ``with`` block without a commit (an exception, Ctrl-C, SIGTERM turned into an exception by the
    CLI) removes the temporary folder.
    """

    def __init__(self, dst: str | os.PathLike, *, overwrite: bool = False) -> None:
        self.dst = Path(os.path.abspath(os.fspath(dst)))
        self.overwrite = overwrite
        self.folder: Path | None = None
        self._lock: int | None = None
        check_destination(self.dst, overwrite)

    def __enter__(self) -> Staging:
        parent = self.dst.parent
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale(parent)
        if self.dst.is_dir():
            remove_stale(self.dst)
        if self.dst.is_dir() and is_empty(self.dst):
            self.folder, self._lock = _make_folder(self.dst, _FILL_MARK)
        else:
            self.folder, self._lock = _make_folder(parent, f".{self.dst.name}{_TEMP_MARK}")
            if self.dst.is_dir():
                # before any file is made, so that they inherit a set-group-id folder's group
                _copy_identity(self.dst, self.folder, writable=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.folder is not None and self.folder.exists():
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def commit(self) -> None:
        """Publish the finished staging folder as DST (see the module docstring for the three cases)."""
        folder = self.folder
        assert folder is not None, "commit() outside the with block"
        _fsync_dir(folder)
        if folder.parent == self.dst:
            if not is_empty(self.dst, ignore=folder.name):
                raise UsageError(f"{self.dst}: files appeared in the folder while it was being written; nothing was changed")
            _fill(folder, self.dst)
            self.folder = None
            return
        if not self.dst.exists():
            os.rename(folder, self.dst)
            self.folder = None
            _fsync_dir(self.dst.parent)
            return
        if not self.overwrite:
            raise UsageError(f"{self.dst}: appeared while the output was being written; nothing was changed")
        _keep_other_files(self.dst, folder)
        _copy_identity(self.dst, folder)
        _fsync_dir(folder)
        aside = _make_folder(self.dst.parent, f".{self.dst.name}{_OLD_MARK}", lock=False)[0]
        os.replace(self.dst, aside)  # an empty folder is replaced atomically
        os.replace(folder, self.dst)
        self.folder = None
        _fsync_dir(self.dst.parent)
        shutil.rmtree(aside, ignore_errors=True)


def _make_folder(parent: Path, prefix: str, *, lock: bool = True) -> tuple[Path, int | None]:
    """``mkdir`` a fresh ``PREFIX+PID-RANDOM`` folder (mode 0777 under the umask), locked while this process lives."""
    while True:
        path = parent / f"{prefix}{os.getpid()}-{os.urandom(4).hex()}"
        try:
            os.mkdir(path, 0o777)
            break
        except FileExistsError:
            continue
    if not lock:
        return path, None
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pass  # a file system without locks: the PID alone tells stale folders
    return path, fd


def _copy_identity(source: Path, target: Path, *, writable: bool = False) -> None:
    """Give ``target`` the mode, group, owner and ACLs of ``source``, as far as this user may (``writable``: keep
    the owner's write permission, for a folder still being filled)."""
    info = source.stat()
    try:
        os.chown(target, info.st_uid, info.st_gid)
    except PermissionError:
        try:
            os.chown(target, -1, info.st_gid)  # the group is allowed when the user is in it
        except PermissionError:
            pass
    # after chown, which may clear the set-gid bit
    os.chmod(target, stat.S_IMODE(info.st_mode) | (stat.S_IRWXU if writable else 0))
    for name in _ACL_XATTRS:
        try:
            os.setxattr(target, name, os.getxattr(source, name))
        except (OSError, AttributeError):
            pass  # no ACL there, or a file system (or platform) without them


def _fill(folder: Path, dst: Path) -> None:
    """Move ``folder``'s entries into its parent ``dst``, indexes last, after journalling their names."""
    names = sorted(os.listdir(folder), key=lambda name: (name.endswith(".index.json"), name))
    journal = folder / _JOURNAL
    with open(journal, "w", encoding="utf-8") as handle:
        handle.write("\n".join(names) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    for name in names:
        os.rename(folder / name, dst / name)
    _fsync_dir(dst)
    shutil.rmtree(folder, ignore_errors=True)


def _undo_fill(folder: Path) -> None:
    """A fill killed midway: take back out of DST what it had moved in (DST was empty), then drop the folder."""
    journal = folder / _JOURNAL
    if journal.exists():
        moved = [name for name in journal.read_text(encoding="utf-8").splitlines() if name]
        if any((folder / name).exists() for name in moved):  # not finished: undo
            for name in moved:
                path = folder.parent / name
                if (folder / name).exists() or not os.path.lexists(path):
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink()
    shutil.rmtree(folder, ignore_errors=True)


def _keep_other_files(dst: Path, folder: Path) -> None:
    """Put everything in ``dst`` that is not part of a checkpoint layout into ``folder``, by hard link where possible.

    Names already in ``folder`` (the new checkpoint's own config and tokenizer files) win over the old ones.
    """
    for path in dst.iterdir():
        if is_layout_name(path.name) or _STALE_RE.match(path.name) or os.path.lexists(folder / path.name):
            continue
        target = folder / path.name
        if target.exists() or target.is_symlink():
            continue  # written by this run (a transformed config.json): the new one wins
        if path.is_symlink():
            os.symlink(os.readlink(path), target)
        elif path.is_dir():
            shutil.copytree(path, target, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(path, target)


def link_or_copy(source, target) -> None:
    """Hard-link ``source`` at ``target``, or copy it (with its mode and times) where links are impossible."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def is_empty(folder: Path, *, ignore: str | None = None) -> bool:
    """True when ``folder`` holds nothing but shardkit temporary folders of dead runs (and ``ignore``)."""
    for entry in os.scandir(folder):
        if entry.name == ignore:
            continue
        match = _STALE_RE.match(entry.name)
        if match and match["kind"] == "fill" and _stale(Path(entry.path), int(match["pid"])):
            continue
        return False
    return True


def check_destination(dst: Path, overwrite: bool) -> None:
    """Refuse a DST that is a file, or a non-empty folder without ``overwrite``."""
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"{dst}: exists and is not a folder")
    if dst.is_dir() and not overwrite and not is_empty(dst):
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


def remove_stale(folder: str | os.PathLike) -> None:
    """Clean up after killed runs in ``folder``: put back a DST left aside by an interrupted overwrite, undo an
    interrupted fill, and remove temporary and set-aside folders, whatever DST they were for."""
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return
    # set-aside folders first: a swap killed between its renames must get its DST back before anything else
    for entry in sorted(entries, key=lambda e: "old" not in e.name):
        match = _STALE_RE.match(entry.name)
        if not match or not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path)
        if not _stale(path, int(match["pid"]), locked=match["kind"] != "old"):
            continue
        if match["kind"] == "old":
            dst = folder / match["name"] if match["name"] else None
            if dst is not None and not os.path.lexists(dst):
                os.replace(path, dst)  # killed between the two renames of a swap: the old checkpoint comes back
                continue
            shutil.rmtree(path, ignore_errors=True)
        elif match["kind"] == "fill":
            _undo_fill(path)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _stale(path: Path, pid: int, *, locked: bool = True) -> bool:
    """The run that made ``path`` is gone: its PID does not exist here, and nobody holds the folder's lock."""
    if pid == os.getpid() or _alive(pid):
        return False
    if not locked:
        return True
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN)  # held: a live run elsewhere
    finally:
        os.close(fd)
    return True


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
