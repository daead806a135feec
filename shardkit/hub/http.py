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

from ..errors import CheckpointError, HubError

STREAM_CHUNK = 64 * 1024
TIMEOUT = float(os.environ.get("HF_HUB_DOWNLOAD_TIMEOUT", "10") or 10)


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


class Fetcher:
    """Reads parts of files at URLs with the Hub's auth headers, counting the body bytes received."""

    def __init__(self, headers: dict[str, str], *, label: str = "") -> None:
        self.headers = {**headers, "Accept-Encoding": "identity"}
        self.label = label  # the repo, for error messages
        self.bytes_received = 0
        self._lock = threading.Lock()  # headers of several shards are read from a thread pool

    def read_range(self, url: str, start: int, length: int, *, name: str) -> bytes:
        """Bytes ``[start, start + length)`` of the file at ``url`` (fewer only if the file is shorter)."""
        if length <= 0:
            return b""
        headers = {**self.headers, "Range": f"bytes={start}-{start + length - 1}"}
        with self._stream(url, headers, name) as (status, chunks):
            skip = start if status == 200 else 0  # 200: the server ignored Range and sends from byte 0
            return self._collect(chunks, skip, length)

    def read_all(self, url: str, limit: int, *, name: str) -> bytes:
        """The whole file at ``url``; a file longer than ``limit`` bytes is refused after ``limit + 1`` bytes."""
        with self._stream(url, dict(self.headers), name) as (_, chunks):
            data = self._collect(chunks, 0, limit + 1)
        if len(data) > limit:
            raise CheckpointError(name, f"is over the {limit}-byte limit for this kind of file", code="index-invalid")
        return data

    def _collect(self, chunks, skip: int, length: int) -> bytes:
        buffer = bytearray()
        for chunk in chunks:
            with self._lock:
                self.bytes_received += len(chunk)
            if skip:
                dropped = min(skip, len(chunk))
                chunk, skip = chunk[dropped:], skip - dropped
            buffer += chunk[: length - len(buffer)]
            if len(buffer) >= length:
                break  # leaving the stream closes the response: the rest is never read
        return bytes(buffer)

    @contextlib.contextmanager
    def _stream(self, url: str, headers: dict[str, str], name: str):
        from huggingface_hub.utils import get_session

        session = get_session()
        try:
            if hasattr(session, "stream"):  # httpx / httpx2 client (huggingface_hub >= 1.0)
                with session.stream("GET", url, headers=headers, follow_redirects=True, timeout=TIMEOUT) as response:
                    _raise_for_status(response.status_code, response.headers, self.label or url, name)
                    yield response.status_code, response.iter_bytes(STREAM_CHUNK)
            else:  # requests session (huggingface_hub < 1.0)
                response = session.get(url, headers=headers, stream=True, allow_redirects=True, timeout=TIMEOUT)
                with contextlib.closing(response):
                    _raise_for_status(response.status_code, response.headers, self.label or url, name)
                    yield response.status_code, response.iter_content(STREAM_CHUNK)
        except Exception as exc:
            if is_hub_failure(exc):
                raise translate(exc, what=url) from None
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
    """A one-line :class:`HubError` for an exception raised by huggingface_hub or its HTTP library."""
    try:
        from huggingface_hub import errors as hf_errors
    except ImportError:  # huggingface_hub < 0.25 keeps them in utils
        from huggingface_hub import utils as hf_errors

    name = repo or what
    endpoint = hub_endpoint()
    if isinstance(exc, getattr(hf_errors, "GatedRepoError", ())):
        return HubError(
            f"{name}: the repo is gated: accept its terms on the Hub, then pass a token (--token or HF_TOKEN)", code="repo-gated"
        )
    if isinstance(exc, getattr(hf_errors, "RevisionNotFoundError", ())):
        return HubError(f"{name}: no such revision on {endpoint}", code="revision-not-found")
    if isinstance(exc, (getattr(hf_errors, "RemoteEntryNotFoundError", ()), getattr(hf_errors, "EntryNotFoundError", ()))):
        return HubError(f"{name}: no such file or folder in the repo", code="missing-file")
    if isinstance(exc, getattr(hf_errors, "RepositoryNotFoundError", ())):
        return HubError(
            f"{name}: repository not found on {endpoint} (if it is private or gated, pass a token: --token or HF_TOKEN)",
            code="repo-not-found",
        )
    if isinstance(exc, getattr(hf_errors, "OfflineModeIsEnabled", ())):
        return HubError(f"{name}: cannot reach {endpoint}: HF_HUB_OFFLINE is set", code="hub-offline")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return HubError(
            f"{name}: access denied ({status}) by {endpoint}: pass a token with access (--token or HF_TOKEN)",
            code="repo-access-denied",
        )
    cause = exc.__cause__ or exc.__context__  # hf_hub_download wraps a connection error in LocalEntryNotFoundError
    if not isinstance(exc, network_errors()) and isinstance(cause, network_errors()):
        exc = cause
    if isinstance(exc, network_errors()):
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return HubError(f"{name}: cannot reach {endpoint} ({reason})", code="hub-unreachable")
    if isinstance(exc, getattr(hf_errors, "HfHubHTTPError", ())):
        return HubError(f"{name}: {str(exc).splitlines()[0]}", code="hub-http-error")
    return HubError(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", code="hub-error")
