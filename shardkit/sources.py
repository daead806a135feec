"""Where a checkpoint's files come from: one interface for a local folder and a Hub repo.

:class:`Source` is what the table builders and the validation checks read through: list the files, stat one,
read a byte range, read an index or a file's header, and (remote sources) prefetch headers in parallel.
:class:`LocalFolder` is a folder on disk; :class:`shardkit.hub.remote.HubRepo` a Hub repo read by HTTP ranges.
:func:`open_source` makes the one decision "local path or Hub repo id?" for every command, and
:func:`open_remote_checkpoint` reads a Hub repo's table from headers alone.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Protocol, runtime_checkable

from .errors import CheckpointError
from .fileio import read_exact
from .formats import open_file
from .formats.safetensors import header_problems, parse_header_length
from .naming import INDEX_RE, looks_like_repo_id, select_checkpoint
from .paths import resolve_cache_repo, resolve_in_folder
from .reader import assemble_checkpoint, open_checkpoint, read_index
from .table import Checkpoint, FileInfo, IndexInfo, TensorEntry


@runtime_checkable
class Source(Protocol):
    """A checkpoint's files, local or remote. Names are relative to the source's folder, ``/``-separated.

    ``label`` names the source in errors and reports; ``folder`` is its local folder, or None for a remote one
    (whose files must be downloaded before tensor data is read); ``bytes_downloaded`` counts file content fetched.
    Every reading method raises :class:`~shardkit.errors.CheckpointError` naming the file and the problem.
    """

    label: str

    @property
    def folder(self) -> Path | None: ...

    @property
    def bytes_downloaded(self) -> int: ...

    def listing(self) -> dict[str, int]:
        """``{file name: size}`` of the folder's files (no subfolders)."""
        ...

    def size(self, name: str) -> int | None:
        """The size of ``name``, or None if there is no such file."""
        ...

    def check_path(self, name: str) -> None:
        """Raise :class:`~shardkit.errors.UnsafePathError` if ``name`` (from an index) leads outside the folder."""
        ...

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        """``size`` bytes of ``name`` at ``offset``; ``short-read`` if the file ends first."""
        ...

    def read_index(self, name: str) -> IndexInfo: ...

    def open_file(self, name: str) -> tuple[FileInfo, list[TensorEntry]]:
        """A checkpoint file's header as the reader sees it (never its tensor data)."""
        ...

    def header_problems(self, name: str) -> list[CheckpointError]:
        """After :meth:`open_file` failed on a safetensors rule: every rule that header breaks."""
        ...

    def prefetch(self, names: list[str]) -> None:
        """Start reading the headers of ``names`` (a no-op where reads are cheap)."""
        ...

    def select_checkpoint(self, variant: str | None = None) -> str:
        """The file or index transformers would load here; ``ambiguous`` / ``no-checkpoint`` otherwise."""
        ...

    def fetch_config(self) -> str | None:
        """A local path of the ``config.json`` beside the checkpoint, or None if there is none."""
        ...


class LocalFolder:
    """The files of one folder on disk; ``selected`` pins one checkpoint file or index of it (a file target)."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        label: str | None = None,
        selected: str | None = None,
        target: str | None = None,
        revision: str | None = None,
        from_cache: str | None = None,
    ) -> None:
        self._folder = Path(folder)
        self.label = label if label is not None else str(self._folder)
        self.selected = selected
        #: the path as the user gave it (joined with a subfolder), for :func:`shardkit.open_checkpoint`
        self.target = target if target is not None else str(self._folder / selected if selected else self._folder)
        self.revision = revision
        #: the cached snapshot a Hub repo id resolved to, when the Hub could not be reached
        self.from_cache = from_cache

    @property
    def folder(self) -> Path:
        return self._folder

    @property
    def bytes_downloaded(self) -> int:
        return 0

    def path(self, name: str) -> str:
        return str(self._folder / name)

    def listing(self) -> dict[str, int]:
        # Everything but folders: a FIFO or dangling symlink named like a checkpoint must become a finding,
        # not vanish (its size reads 0).
        files = {}
        with os.scandir(self._folder) as entries:
            for entry in entries:
                try:
                    info = entry.stat()  # follows symlinks: a HF cache snapshot is all symlinks
                except OSError:
                    files[entry.name] = 0  # dangling symlink
                    continue
                if not stat.S_ISDIR(info.st_mode):
                    files[entry.name] = info.st_size if stat.S_ISREG(info.st_mode) else 0
        return files

    def check_path(self, name: str) -> None:
        resolve_in_folder(self._folder, name, index_path=self.label)

    def size(self, name: str) -> int | None:
        try:
            return os.stat(self._folder / name).st_size
        except OSError:
            return None

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        self._require_regular(name)
        fd = os.open(self._folder / name, os.O_RDONLY)
        try:
            return bytes(read_exact(fd, size, offset, self.path(name)))
        finally:
            os.close(fd)

    def read_index(self, name: str) -> IndexInfo:
        self._require_regular(name)
        return read_index(self._folder / name)

    def open_file(self, name: str) -> tuple[FileInfo, list[TensorEntry]]:
        self._require_regular(name)
        return open_file(self._folder / name)

    def header_problems(self, name: str) -> list[CheckpointError]:
        """Every header rule the safetensors file ``name`` breaks (:func:`open_file` stops at the first)."""
        path = str(self._folder / name)
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            length = parse_header_length(path, handle.read(8), size)
            return header_problems(path, handle.read(length), size)

    def prefetch(self, names: list[str]) -> None:
        """Local headers are read on demand: nothing to start."""

    def select_checkpoint(self, variant: str | None = None) -> str:
        if self.selected is not None:
            return self.selected
        return select_checkpoint(list(self.listing()), self.label, variant, hint="; pass the file or index to use")

    def fetch_config(self) -> str | None:
        path = self._folder / "config.json"
        return str(path) if path.is_file() else None

    def table(self, variant: str | None = None) -> Checkpoint:
        """The checkpoint's table, exactly as :func:`shardkit.open_checkpoint` reads the path given."""
        return open_checkpoint(self.target, variant=variant, revision=self.revision or "main")

    def _require_regular(self, name: str) -> None:
        # A FIFO or device named like a shard would block or never end: refuse anything but a regular file.
        path = self._folder / name
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise CheckpointError(path, "no such file", code="missing-file") from None
        except OSError as exc:
            raise CheckpointError(path, f"cannot be read ({exc.strerror})", code="unreadable") from None
        if not stat.S_ISREG(mode):
            raise CheckpointError(path, "is not a regular file", code="not-a-file")


def is_hub_id(target: str | os.PathLike[str]) -> bool:
    """Whether ``target`` means a Hub repo: no such local path, and shaped ``org/name``."""
    text = os.fspath(target)
    return not os.path.exists(text) and looks_like_repo_id(text)


def open_source(
    target: str | os.PathLike[str],
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    repo_type: str = "model",
    token: str | bool | None = None,
) -> Source:
    """The source ``target`` names: a local file, folder or Hugging Face cache folder when that path exists,
    else a Hub repo id (``org/name``; ``revision``, ``subfolder``, ``repo_type`` and ``token`` apply).

    A local folder resolves a ``models--org--name`` cache folder to the snapshot of ``revision``, then
    ``subfolder``; a local file becomes its folder with the file selected. A Hub repo is a
    :class:`~shardkit.hub.remote.HubRepo`, or the cached snapshot (a :class:`LocalFolder` with ``from_cache``)
    when ``HF_HUB_OFFLINE`` is set or the Hub can't be reached. Raises :class:`~shardkit.errors.CheckpointError`
    (``missing-file``) for a path that exists nowhere, :class:`~shardkit.errors.HubError` for an unusable repo.
    """
    text = os.fspath(target)
    if is_hub_id(text):
        return open_hub_source(text, revision=revision, subfolder=subfolder, repo_type=repo_type, token=token)
    path = Path(text)
    if not path.exists():
        raise CheckpointError(text, "no such file or folder (nor a Hub repo id org/name)", code="missing-file")
    if path.is_dir():
        folder = resolve_cache_repo(path, revision or "main")
        if subfolder:
            folder = folder / subfolder
        given = os.path.join(text, subfolder) if subfolder else text
        return LocalFolder(folder, target=given, revision=revision)
    return LocalFolder(path.parent, label=text, selected=path.name, target=text)


def open_hub_source(
    repo_id: str,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    repo_type: str = "model",
    token: str | bool | None = None,
) -> Source:
    """``repo_id`` on the Hub, or its cached snapshot when the Hub can't answer (see :func:`open_source`)."""
    from .hub.cache import open_repo

    repo = open_repo(repo_id, revision=revision, subfolder=subfolder, repo_type=repo_type, token=token)
    if isinstance(repo, Path):
        return LocalFolder(repo, from_cache=str(repo))
    return repo


def read_table(source: Source, variant: str | None = None) -> Checkpoint:
    """The table of ``source``'s checkpoint from headers alone; raises on the first problem
    (:func:`shardkit.validate` lists them all)."""
    if isinstance(source, LocalFolder):
        return source.table(variant)
    selected = source.select_checkpoint(variant)
    if not INDEX_RE.match(selected):
        return assemble_checkpoint(source.label, [(selected, *source.open_file(selected))], root="")
    index = source.read_index(selected)
    names = sorted(set(index.weight_map.values()))
    for name in names:
        source.check_path(name)
    source.prefetch(names)
    opened = [(name, *source.open_file(name)) for name in names]
    return assemble_checkpoint(source.label, opened, root="", index=index, index_label=selected)


def open_remote_checkpoint(
    repo_id: str,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    variant: str | None = None,
    repo_type: str = "model",
    token: str | bool | None = None,
) -> Checkpoint:
    """The table of a Hub repo's checkpoint from headers alone (what ``inspect org/name`` shows).

    When ``HF_HUB_OFFLINE`` is set or the Hub can't be reached, the checkpoint of the cached snapshot is read
    instead. Raises like :func:`shardkit.open_checkpoint` on the first problem; use :func:`shardkit.validate`
    to list all.
    """
    source = open_hub_source(repo_id, revision=revision, subfolder=subfolder, repo_type=repo_type, token=token)
    return read_table(source, variant)


__all__ = [
    "Source",
    "LocalFolder",
    "is_hub_id",
    "open_source",
    "open_hub_source",
    "read_table",
    "open_remote_checkpoint",
    "select_checkpoint",
]
