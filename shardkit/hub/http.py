"""Bounded HTTP reads of Hub files, through huggingface_hub's shared session.

:meth:`Fetcher.read_range` asks for ``bytes=start-stop`` and stops reading once it has them, even when the server
ignores ``Range`` and sends the whole file: the body is streamed and the response closed early, so a lying or
Range-blind server costs at most ``start + length`` bytes plus one network chunk. :class:`Fetcher` counts every
body byte received.
Works with huggingface_hub 1.x/2.x (httpx-style clients with ``stream()``) and 0.x (requests sessions).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

from ..errors import CheckpointError, HubError

STREAM_CHUNK = 64 * 1024
#: Seconds without a byte from the server before a call gives up, when neither setting below is given.
DEFAULT_TIMEOUT = 10.0


def _setting(name: str) -> float:
    """A timeout setting: the environment now, else huggingface_hub's constant (read at its import), else 10 s."""
    from huggingface_hub import constants

    for value in (os.environ.get(name), getattr(constants, name, None)):
        try:
            seconds = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if seconds > 0:
            return seconds
    return DEFAULT_TIMEOUT


def metadata_timeout() -> float:
    """Seconds to wait on a metadata call (repo info, listing, HEAD): ``HF_HUB_ETAG_TIMEOUT``, as huggingface_hub."""
    return _setting("HF_HUB_ETAG_TIMEOUT")


def download_timeout() -> float:
    """Seconds to wait for the next bytes of a file: ``HF_HUB_DOWNLOAD_TIMEOUT``, as huggingface_hub."""
    return _setting("HF_HUB_DOWNLOAD_TIMEOUT")


_bound_lock = threading.Lock()
_bound_depth = 0
_bound_saved = None


@contextlib.contextmanager
def bounded_session():
    """Give huggingface_hub's shared HTTP client a timeout while shardkit calls through it.

    huggingface_hub's client waits forever by default (``timeout=None``) and only some ``HfApi`` methods take a
    timeout, so a server that accepts the connection and never answers would hang ``list_repo_tree``. A timeout
    the user configured on the client is kept; ours is removed again when the outermost call returns.
    """
    global _bound_depth, _bound_saved
    from huggingface_hub.utils import get_session

    session = get_session()
    with _bound_lock:
        current = getattr(session, "timeout", None)
        unbounded = current is not None and all(
            getattr(current, part, 0) is None for part in ("connect", "read", "write", "pool")
        )
        if _bound_depth == 0 and unbounded:
            _bound_saved = (session, current)
            session.timeout = metadata_timeout()
        _bound_depth += 1
    try:
        yield
    finally:
        with _bound_lock:
            _bound_depth -= 1
            if _bound_depth == 0 and _bound_saved is not None:
                saved_session, saved = _bound_saved
                saved_session.timeout = saved
                _bound_saved = None


def hub_endpoint() -> str:
    """``HF_ENDPOINT`` as set now (huggingface_hub reads it once at import), else huggingface_hub's endpoint."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def network_errors() -> tuple[type[BaseException], ...]:
    """The transport-level exception classes of whichever HTTP library huggingface_hub uses."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (
        ("httpx2", ("TransportError",)),
        ("httpx", ("TransportError",)),
        ("requests", ("ConnectionError", "Timeout")),
    ):
        try:
            imported = __import__(module)
        except ImportError:
            continue
        errors += [getattr(imported, n) for n in names if hasattr(imported, n)]
    return tuple(errors)


class Body:
    """The body of one GET, read on demand; ``ranged`` says whether the server honoured ``Range`` (206).

    A server that ignores ``Range`` answers 200 with the whole file from byte 0: the bytes before the wanted
    start are read and dropped, and whoever needs more of the file keeps reading this same answer rather than
    asking again (every new request would restart from byte 0).
    """

    def __init__(self, fetcher: Fetcher, status: int, chunks, *, skip: int) -> None:
        self.status = status
        self.ranged = status == 206
        self._fetcher, self._chunks, self._pending = fetcher, iter(chunks), b""
        self._skip = skip

    def read(self, length: int) -> bytes:
        """Up to ``length`` bytes (fewer only at the end of the body)."""
        buffer = bytearray()
        while len(buffer) < length:
            piece = self._next(length - len(buffer))
            if not piece:
                break
            buffer += piece
        return bytes(buffer)

    def copy_to(self, out, length: int) -> int:
        """Write up to ``length`` more bytes of the body to the file ``out``; return how many were written."""
        done = 0
        while done < length:
            piece = self._next(min(length - done, STREAM_CHUNK))
            if not piece:
                break
            out.write(piece)
            done += len(piece)
        return done

    def _next(self, limit: int) -> bytes:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            self._fetcher.count(len(chunk))
            if self._skip:
                dropped = min(self._skip, len(chunk))
                chunk, self._skip = chunk[dropped:], self._skip - dropped
            self._pending = chunk
        piece, self._pending = self._pending[:limit], self._pending[limit:]
        return piece


class Fetcher:
    """Reads parts of files at URLs with the Hub's auth headers, counting the body bytes received.

    ``range_ignored`` turns true once the server answered a ranged request with the whole file (olah, some
    proxies): readers then stream each file once instead of asking for more ranges.
    """

    def __init__(self, headers: dict[str, str], *, label: str = "") -> None:
        self.headers = {**headers, "Accept-Encoding": "identity"}
        self.label = label  # the repo, for error messages
        self.bytes_received = 0
        self.range_ignored = False
        self._lock = threading.Lock()  # headers of several shards are read from a thread pool

    def count(self, received: int) -> None:
        with self._lock:
            self.bytes_received += received

    @contextlib.contextmanager
    def open(self, url: str, start: int, length: int, *, name: str):
        """A :class:`Body` positioned at ``start`` that was asked for ``[start, start + length)``.

        Leaving the block closes the response, so a server sending more than was asked for is cut off there.
        """
        headers = {**self.headers, "Range": f"bytes={start}-{start + length - 1}"}
        with self._stream(url, headers, name) as (status, chunks):
            if status == 200:
                self.range_ignored = True
            yield Body(self, status, chunks, skip=start if status == 200 else 0)

    def read_range(self, url: str, start: int, length: int, *, name: str) -> bytes:
        """Bytes ``[start, start + length)`` of the file at ``url`` (fewer only if the file is shorter)."""
        if length <= 0:
            return b""
        with self.open(url, start, length, name=name) as body:
            return body.read(length)

    def probe(self, url: str, *, name: str) -> None:
        """A HEAD of ``url`` within the metadata timeout: raises the one-line error if the file can't be fetched.

        Run before ``hf_hub_download``, whose own retries after a network error wait up to 60 s a try.
        """
        from huggingface_hub.utils import get_session

        session: Any = get_session()  # an httpx(2) client; a requests session before huggingface_hub 1.0
        try:
            if hasattr(session, "stream"):
                response = session.head(url, headers=self.headers, follow_redirects=True, timeout=metadata_timeout())
            else:
                response = session.head(url, headers=self.headers, allow_redirects=True, timeout=metadata_timeout())
            _raise_for_status(response.status_code, response.headers, self.label or url, name)
        except Exception as exc:
            if is_hub_failure(exc):
                raise translate(exc, what=f"{self.label}: {name}" if self.label else url, repo=self.label or None) from None
            raise

    def read_all(self, url: str, limit: int, *, name: str) -> bytes:
        """The whole file at ``url``; a file longer than ``limit`` bytes is refused after ``limit + 1`` bytes."""
        with self._stream(url, dict(self.headers), name) as (status, chunks):
            data = Body(self, status, chunks, skip=0).read(limit + 1)
        if len(data) > limit:
            raise CheckpointError(name, f"is over the {limit}-byte limit for this kind of file", code="index-invalid")
        return data

    @contextlib.contextmanager
    def _stream(self, url: str, headers: dict[str, str], name: str):
        from huggingface_hub.utils import get_session

        session: Any = get_session()
        try:
            if hasattr(session, "stream"):  # httpx / httpx2 client (huggingface_hub >= 1.0)
                with session.stream("GET", url, headers=headers, follow_redirects=True, timeout=download_timeout()) as response:
                    _raise_for_status(response.status_code, response.headers, self.label or url, name)
                    yield response.status_code, response.iter_bytes(STREAM_CHUNK)
            else:  # requests session (huggingface_hub < 1.0)
                response = session.get(url, headers=headers, stream=True, allow_redirects=True, timeout=download_timeout())
                with contextlib.closing(response):
                    _raise_for_status(response.status_code, response.headers, self.label or url, name)
                    yield response.status_code, response.iter_content(STREAM_CHUNK)
        except Exception as exc:
            if is_hub_failure(exc):
                raise translate(exc, what=f"{self.label}: {name}" if self.label else url, repo=self.label or None) from None
            raise


def _raise_for_status(status: int, headers, where: str, name: str) -> None:
    if status < 400:
        return
    error_code = headers.get("X-Error-Code", "")
    if status == 404 and error_code in ("EntryNotFound", ""):
        raise CheckpointError(name, "is listed but the server has no such file (404)", code="missing-file")
    if error_code == "GatedRepo":
        raise HubError(
            f"{where}: the repo is gated: accept its terms on the Hub, then pass a token (--token or HF_TOKEN)", code="repo-gated"
        )
    if status in (401, 403):
        raise HubError(
            f"{where}: access denied ({status}): the repo is private or gated; pass a token with access (--token or HF_TOKEN)",
            code="repo-access-denied",
        )
    if error_code == "RepoNotFound" or status == 404:
        raise HubError(f"{where}: repository not found (404)", code="repo-not-found")
    if status == 416:
        raise CheckpointError(name, "is shorter than the repo listing says (416 Range Not Satisfiable)", code="sf-truncated")
    raise HubError(f"{where}: the server answered {status} for {name}", code="hub-http-error")


def is_hub_failure(exc: BaseException) -> bool:
    """Whether ``exc`` reports the Hub or the network (to translate), rather than a bug (to let through)."""
    return isinstance(exc, network_errors()) or type(exc).__module__.startswith("huggingface_hub")


def translate(exc: BaseException, *, what: str, repo: str | None = None) -> HubError:
    """A one-line :class:`HubError` for an exception raised by huggingface_hub or its HTTP library.

    ``repo`` names the repo in errors about the repo; ``what`` (the repo and a file) in errors about one file.
    """
    try:
        from huggingface_hub import errors as hf_errors
    except ImportError:  # huggingface_hub < 0.25 keeps them in utils
        from huggingface_hub import utils as hf_errors  # type: ignore[no-redef]

    name = repo or what
    endpoint = hub_endpoint()
    # hf_hub_download reports a lost connection as LocalEntryNotFoundError (an EntryNotFoundError) raised from
    # the network error: the cause decides, or a dropped connection would read "no such file".
    cause = exc.__cause__ or exc.__context__
    offline = getattr(hf_errors, "OfflineModeIsEnabled", ())
    if not isinstance(exc, network_errors()) and isinstance(cause, network_errors()):
        exc = cause
    if isinstance(exc, offline):
        return HubError(f"{name}: cannot reach {endpoint}: HF_HUB_OFFLINE is set", code="hub-offline")
    if isinstance(exc, network_errors()):
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return HubError(f"{name}: cannot reach {endpoint} ({reason})", code="hub-unreachable")
    if isinstance(exc, getattr(hf_errors, "GatedRepoError", ())):
        return HubError(
            f"{name}: the repo is gated: accept its terms on the Hub, then pass a token (--token or HF_TOKEN)", code="repo-gated"
        )
    if isinstance(exc, getattr(hf_errors, "RevisionNotFoundError", ())):
        return HubError(f"{name}: no such revision on {endpoint}", code="revision-not-found")
    if isinstance(exc, (getattr(hf_errors, "RemoteEntryNotFoundError", ()), getattr(hf_errors, "EntryNotFoundError", ()))):
        return HubError(f"{what}: no such file or folder in the repo", code="missing-file")
    if isinstance(exc, getattr(hf_errors, "RepositoryNotFoundError", ())):
        return HubError(
            f"{name}: repository not found on {endpoint} (if it is private or gated, pass a token: --token or HF_TOKEN)",
            code="repo-not-found",
        )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return HubError(
            f"{name}: access denied ({status}) by {endpoint}: pass a token with access (--token or HF_TOKEN)",
            code="repo-access-denied",
        )
    if isinstance(exc, getattr(hf_errors, "HfHubHTTPError", ())):
        return HubError(f"{name}: {str(exc).splitlines()[0]}", code="hub-http-error")
    return HubError(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", code="hub-error")
