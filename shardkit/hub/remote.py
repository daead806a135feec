"""A Hub repo read like a checkpoint folder: its listing, its index, and each file's header by HTTP ranges.

A safetensors header costs at most two requests: the first :data:`PREFIX` bytes (which hold the whole header
of ~97% of Hub files), then the rest of the header if it is longer. The declared layout is checked against the
size the repo listing gives (``8 + N + data == size``) exactly as a local file is checked against ``stat``.
A torch zip ``.bin`` is read through :class:`RangeFile` (its central directory, ``data.pkl`` and one small
range per record's local header). Nothing beyond headers is fetched.
"""

from __future__ import annotations

import io
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from io import BufferedRandom
from typing import BinaryIO, cast
from urllib.parse import quote

from ..errors import CheckpointError
from ..formats import sniff
from ..formats.safetensors import header_problems, parse_header, parse_header_length
from ..formats.torchzip import read_torch_zip
from ..naming import INDEX_RE, looks_like_repo_id, select_checkpoint
from ..paths import check_relative_name
from ..reader import MAX_INDEX_SIZE, parse_index
from ..table import FileInfo, IndexInfo, TensorEntry
from .http import Fetcher, bounded_session, hub_endpoint, is_hub_failure, metadata_timeout, translate

#: First request per file: the hub's own heuristic (huggingface_hub PR #1855).
PREFIX = 100_000
#: Header reads in flight at once (huggingface_hub's get_safetensors_metadata also uses a thread pool).
WORKERS = 8
#: config.json and other small JSON files fetched whole.
MAX_CONFIG_SIZE = 16 * 1024 * 1024


class HubRepo:
    """One revision of a Hub repo (optionally a subfolder), with the interface of a local checkpoint folder.

    Creating it resolves ``revision`` to a commit (so every later read sees the same files) and raises
    :class:`~shardkit.errors.HubError` with one line for a missing repo or revision, no access, or no network.
    """

    def __init__(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        repo_type: str = "model",
        token: str | bool | None = None,
    ) -> None:
        from huggingface_hub import HfApi
        from huggingface_hub.utils import build_hf_headers

        self.repo_id, self.repo_type, self.token = repo_id, repo_type or "model", token
        self.subfolder = (subfolder or "").strip("/")
        self.endpoint = hub_endpoint()
        self.label = repo_id + (f"/{self.subfolder}" if self.subfolder else "") + (f"@{revision}" if revision else "")
        self.folder = None  # nothing local
        self.api = HfApi(endpoint=self.endpoint, token=token)
        info = self._call(
            self.api.repo_info, repo_id, revision=revision or "main", repo_type=self.repo_type, timeout=metadata_timeout()
        )
        self.commit = getattr(info, "sha", None) or revision or "main"
        self.fetcher = Fetcher(build_hf_headers(token=token), label=self.label)
        self._listing: dict[str, int] | None = None
        self._prefetched: dict[str, tuple] = {}
        self._broken_headers: dict[str, tuple[bytes, int]] = {}

    def _call(self, function, *args, **kwargs):
        """``function(*args, **kwargs)`` through huggingface_hub, bounded in time, its failures made one line."""
        try:
            with bounded_session():
                return function(*args, **kwargs)
        except Exception as exc:
            if not is_hub_failure(exc):
                raise
            raise translate(exc, what=self.label, repo=self.label) from None

    @property
    def bytes_downloaded(self) -> int:
        return self.fetcher.bytes_received

    def url(self, name: str) -> str:
        """The ``resolve`` URL of ``name`` at the resolved commit (built here: ``hf_hub_url`` fixes its endpoint at import)."""
        path = f"{self.subfolder}/{name}" if self.subfolder else name
        kind = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return f"{self.endpoint}/{kind}{self.repo_id}/resolve/{quote(self.commit, safe='')}/{quote(path)}"

    def listing(self) -> dict[str, int]:
        """``{file name relative to the subfolder: size}`` of the folder's files (LFS files: the real size)."""
        if self._listing is None:
            items = self._call(
                lambda: list(
                    self.api.list_repo_tree(
                        self.repo_id, path_in_repo=self.subfolder or None, revision=self.commit, repo_type=self.repo_type
                    )
                )
            )
            prefix = self.subfolder + "/" if self.subfolder else ""
            self._listing = {
                item.path[len(prefix) :]: item.size
                for item in items
                if getattr(item, "size", None) is not None
                and item.path.startswith(prefix)
                and "/" not in item.path[len(prefix) :]
            }
        return self._listing

    def check_path(self, name: str) -> None:
        check_relative_name(name, index_path=self.label)

    def size(self, name: str) -> int | None:
        listing = self.listing()
        if name in listing or "/" not in name:
            return listing.get(name)
        # A file in a deeper folder (an index may name one): ask for that path alone.
        path = f"{self.subfolder}/{name}" if self.subfolder else name
        infos = self._call(self.api.get_paths_info, self.repo_id, [path], revision=self.commit, repo_type=self.repo_type)
        sizes = [getattr(i, "size", None) for i in infos if getattr(i, "path", None) == path]
        return sizes[0] if sizes else None

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        """``size`` bytes of ``name`` at ``offset``, by one HTTP range request."""
        data = self.fetcher.read_range(self.url(name), offset, size, name=name)
        if len(data) < size:
            from ..fileio import short_read

            raise short_read(name, offset + len(data), size - len(data))
        return data

    def read_index(self, name: str) -> IndexInfo:
        size = self.size(name)
        if size is None:
            raise CheckpointError(name, "no such index file in the repo", code="missing-file")
        if size > MAX_INDEX_SIZE:
            raise CheckpointError(name, f"index is {size} bytes, over the {MAX_INDEX_SIZE}-byte limit", code="index-invalid")
        return parse_index(name, self.fetcher.read_all(self.url(name), MAX_INDEX_SIZE, name=name))

    def prefetch(self, names: list[str]) -> None:
        """Read the headers of ``names`` :data:`WORKERS` at a time; :meth:`open_file` then answers from memory.

        Round trips dominate on repos of many shards, so they overlap; outcomes are kept per file, errors included.
        """

        def attempt(name):
            try:
                return self._read_header(name), None
            except CheckpointError as exc:
                return None, exc

        with ThreadPoolExecutor(WORKERS) as pool:
            self._prefetched.update(zip(names, pool.map(attempt, names)))

    def open_file(self, name: str) -> tuple[FileInfo, list[TensorEntry]]:
        """The header of the repo file ``name``, read with ranges; raises the reader's :class:`CheckpointError`."""
        if name in self._prefetched:
            result, error = self._prefetched.pop(name)
            if error is not None:
                raise error
            return result
        return self._read_header(name)

    def _read_header(self, name: str) -> tuple[FileInfo, list[TensorEntry]]:
        size = self.size(name)
        if size is None:
            raise CheckpointError(name, "no such file in the repo", code="missing-file")
        url = self.url(name)
        if not size:
            return self._parse(name, b"", size, None)
        with self.fetcher.open(url, 0, min(PREFIX, size), name=name) as body:
            head = body.read(min(PREFIX, size))
            if body.ranged:
                return self._parse(name, head, size, None)
            # The server sent the whole file: whatever more this file needs comes from this same answer.
            return self._parse(name, head, size, body)

    def _parse(self, name: str, head: bytes, size: int, whole) -> tuple[FileInfo, list[TensorEntry]]:
        """The header of ``name`` from its first bytes ``head``; ``whole`` is the rest of a whole-file answer, or None."""
        url = self.url(name)
        fmt = sniff(name, head[:512])
        if fmt == "safetensors":
            length = parse_header_length(name, head, size)
            raw = head[8 : 8 + length]
            if len(raw) < length:
                more = 8 + length - len(head)
                raw += whole.read(more) if whole is not None else self.fetcher.read_range(url, len(head), more, name=name)
            if len(raw) < length:
                raise CheckpointError(
                    name,
                    f"the server sent {8 + len(raw)} bytes of a {8 + length}-byte header (truncated?)",
                    code="sf-header-past-eof",
                )
            try:
                return cast("tuple[FileInfo, list[TensorEntry]]", parse_header(name, raw, size))  # None only with problems=
            except CheckpointError:
                self._broken_headers[name] = (raw, size)  # for header_problems: no second download
                raise
        if fmt == "torch-zip":
            with RangeFile(self.fetcher, url, size, name=name, head=head, whole=whole) as handle:
                return read_torch_zip(name, cast(BinaryIO, handle), size)
        raise CheckpointError(
            name,
            "is a legacy torch file, whose tensors can only be located by loading it: validate a downloaded copy",
            code="not-checked",
        )

    def header_problems(self, name: str) -> list[CheckpointError]:
        """Every header rule the safetensors file ``name`` breaks, from the header its failed read kept."""
        if name not in self._broken_headers:
            return []
        raw, size = self._broken_headers.pop(name)
        return header_problems(name, raw, size)

    def select_checkpoint(self, variant: str | None = None) -> str:
        """The file or index transformers would load from this repo (``variant`` applied); CheckpointError if none."""
        return select_checkpoint(list(self.listing()), self.label, variant)

    def checkpoint_files(self, selected: str) -> list[str]:
        """The files that make up the checkpoint ``selected``: the index and its shards, or the single file."""
        if not INDEX_RE.match(selected):
            return [selected]
        index = self.read_index(selected)
        return [selected] + sorted(set(index.weight_map.values()))

    def fetch_config(self) -> str | None:
        """The repo's ``config.json`` (beside the checkpoint) saved to a temporary folder, or None if it has none."""
        if "config.json" not in self.listing():
            return None
        data = self.fetcher.read_all(self.url("config.json"), MAX_CONFIG_SIZE, name="config.json")
        folder = tempfile.mkdtemp(prefix="shardkit-config-")
        path = os.path.join(folder, "config.json")
        with open(path, "wb") as out:
            out.write(data)
        return path


class RangeFile(io.RawIOBase):
    """A read-only, seekable view of a remote file that fetches :data:`BLOCK`-sized ranges on demand.

    A zip is read from its end, then record by record: one small range per record's local header. Each range is
    a round trip (two on the Hub, whose LFS files redirect), so once :data:`MAX_REQUESTS` ranges were asked for
    one file and at most :data:`STREAM_LIMIT` bytes of it remain, the rest is streamed in one request instead:
    a 19 MB ``.bin`` of 300 records costs one file's size, not 300 round trips; a multi-GB one stays on ranges.
    A server that ignores ``Range`` (each request restarts from byte 0) would send the file again for every
    read: once it is seen to, or when ``whole`` (the rest of a whole-file answer) is given, the file is streamed
    once. Streamed bytes go to a temporary file: bounded memory, the disk space of (the rest of) one file.
    """

    BLOCK = 16 * 1024
    MAX_BLOCKS = 256  # cache bound: 4 MiB
    MAX_REQUESTS = 8
    STREAM_LIMIT = 32 * 1024 * 1024

    def __init__(self, fetcher: Fetcher, url: str, size: int, *, name: str, head: bytes = b"", whole=None) -> None:
        super().__init__()
        self._fetcher, self._url, self._size, self._name = fetcher, url, size, name
        self._pos = 0
        self._head = head  # bytes [0, len(head)) already fetched
        self._blocks: dict[int, bytes] = {}
        self._requests = 0
        self._spool: BufferedRandom | None = None
        self._spool_start = 0  # the spool holds bytes [_spool_start, size)
        if whole is not None:
            self._fill_spool(0, whole)

    def _fill_spool(self, start: int, whole=None) -> None:
        """Stream bytes ``[start, size)`` into the spool (``whole``: go on reading that answer instead)."""
        spool = tempfile.TemporaryFile(prefix="shardkit-hub-")
        begin = start
        if start == 0:
            spool.write(self._head)
            begin = len(self._head)
        rest = self._size - begin
        if whole is not None:
            whole.copy_to(spool, rest)
        elif rest > 0:
            with self._fetcher.open(self._url, begin, rest, name=self._name) as body:
                body.copy_to(spool, rest)
        self._spool, self._spool_start = spool, start
        self._blocks.clear()

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()
        super().close()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), max(0, self._size - self._pos))
        if want <= 0:
            return 0
        if self._spool is None and self._pos + want > len(self._head):
            if self._fetcher.range_ignored:
                self._fill_spool(0)
            elif self._requests >= self.MAX_REQUESTS and self._size - self._pos <= self.STREAM_LIMIT:
                self._fill_spool(self._pos)
        if self._spool is not None and self._pos >= self._spool_start:
            self._spool.seek(self._pos - self._spool_start)
            want = self._spool.readinto(view[:want])
        elif self._pos + want <= len(self._head):
            view[:want] = self._head[self._pos : self._pos + want]
        elif want > self.BLOCK * 4:  # a big read (data.pkl): one exact range, not cached
            self._requests += 1
            data = self._fetcher.read_range(self._url, self._pos, want, name=self._name)
            view[: len(data)] = data
            want = len(data)
        else:
            done = 0
            while done < want:
                index, within = divmod(self._pos + done, self.BLOCK)
                block = self._block(index)
                piece = block[within : within + want - done]
                if not piece:
                    break
                view[done : done + len(piece)] = piece
                done += len(piece)
            want = done
        self._pos += want
        return want

    def _block(self, index: int) -> bytes:
        if index not in self._blocks:
            if len(self._blocks) >= self.MAX_BLOCKS:
                self._blocks.pop(next(iter(self._blocks)))
            start = index * self.BLOCK
            self._requests += 1
            self._blocks[index] = self._fetcher.read_range(self._url, start, min(self.BLOCK, self._size - start), name=self._name)
        return self._blocks[index]


__all__ = ["HubRepo", "RangeFile", "looks_like_repo_id"]
