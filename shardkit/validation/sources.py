"""Where validation reads a checkpoint from: a local folder here, a Hub repo in :mod:`shardkit.hub.remote`.

Both offer the same small interface, so every check runs unchanged on either:

- ``label``: how the report names the location; ``listing()``: ``{file name: size}`` of the folder's files;
- ``check_path(name)``: raise :class:`~shardkit.errors.UnsafePathError` if ``name`` leads outside the folder;
- ``size(name)``: the file's size or None if it is missing;
- ``read_index(name)`` and ``open_file(name)``: the reader's results, or its :class:`CheckpointError`;
- ``header_problems(name)``: after ``open_file`` failed on a safetensors rule, every rule the header breaks;
- ``bytes_downloaded``: bytes of file content fetched so far (always 0 here).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import CheckpointError
from ..formats import open_file
from ..formats.safetensors import header_problems, parse_header_length
from ..reader import read_index, resolve_in_folder
from ..table import FileInfo, IndexInfo, TensorEntry


class LocalFolder:
    """The files of one folder on disk (names are relative to it, ``/``-separated)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.label = str(self.folder)
        self.bytes_downloaded = 0

    def path(self, name: str) -> str:
        return str(self.folder / name)

    def listing(self) -> dict[str, int]:
        # Everything but folders: a FIFO or dangling symlink named like a checkpoint must become a finding,
        # not vanish (its size reads 0).
        files = {}
        with os.scandir(self.folder) as entries:
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
        resolve_in_folder(self.folder, name, index_path=self.label)

    def size(self, name: str) -> int | None:
        try:
            return os.stat(self.folder / name).st_size
        except OSError:
            return None

    def read_index(self, name: str) -> IndexInfo:
        self._require_regular(name)
        return read_index(self.folder / name)

    def open_file(self, name: str) -> tuple[FileInfo, list[TensorEntry]]:
        self._require_regular(name)
        return open_file(self.folder / name)

    def header_problems(self, name: str) -> list[CheckpointError]:
        """Every header rule the safetensors file ``name`` breaks (:func:`open_file` stops at the first)."""
        path = str(self.folder / name)
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            length = parse_header_length(path, handle.read(8), size)
            return header_problems(path, handle.read(length), size)

    def _require_regular(self, name: str) -> None:
        # A FIFO or device named like a shard would block or never end: refuse anything but a regular file.
        path = self.folder / name
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise CheckpointError(path, "no such file", code="missing-file") from None
        except OSError as exc:
            raise CheckpointError(path, f"cannot be read ({exc.strerror})", code="unreadable") from None
        if not stat.S_ISREG(mode):
            raise CheckpointError(path, "is not a regular file", code="not-a-file")
