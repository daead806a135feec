"""The local Hugging Face cache as huggingface_hub lays it out, for repo ids that the Hub can't answer.

``<HF_HUB_CACHE>/models--org--name/`` holds ``blobs/`` (the files, by hash), ``snapshots/<commit>/`` (one tree
of symlinks into ``blobs/`` per commit) and ``refs/<revision>`` (a branch or tag's commit). When the Hub can't
be reached, or ``HF_HUB_OFFLINE`` is set, a repo id resolves to the snapshot its ref (or commit) names, as
``hf_hub_download`` and ``from_pretrained`` do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (huggingface_hub reads it once at import; so do we, through it)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def repo_cache_folder(repo_id: str, repo_type: str = "model") -> Path:
    """``<HF_HUB_CACHE>/models--org--name``: where huggingface_hub caches ``repo_id`` (it may not exist)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"{repo_type or 'model'}s--{repo_id.replace('/', '--')}"


def cached_snapshot(
    repo_id: str, *, revision: str | None = None, subfolder: str | None = None, repo_type: str = "model"
) -> Path | None:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (default main), with ``subfolder``; None if absent.

    A branch or tag resolves through ``refs/<revision>``; a commit names its snapshot directly.
    """
    folder = repo_cache_folder(repo_id, repo_type)
    revision = revision or "main"
    ref = folder / "refs" / revision
    try:
        commit = ref.read_text().strip() if ref.is_file() else revision
    except OSError:
        return None
    if not _COMMIT.match(commit):
        return None
    snapshot = folder / "snapshots" / commit
    if subfolder:
        snapshot = snapshot / subfolder.strip("/")
    return snapshot if snapshot.is_dir() else None


def write_ref(repo_id: str, revision: str | None, commit: str, *, repo_type: str = "model") -> None:
    """Record that ``revision`` (default main) is ``commit`` in the cache, as huggingface_hub does after a download.

    Files fetched pinned to a commit leave no ref behind; without it neither ``validate models--org--name`` nor an
    offline ``from_pretrained("org/name")`` could find the snapshot. A commit needs no ref.
    """
    revision = revision or "main"
    if revision == commit or not _COMMIT.match(commit):
        return
    ref = repo_cache_folder(repo_id, repo_type) / "refs" / revision
    try:
        if ref.is_file() and ref.read_text().strip() == commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.parent / f".{ref.name}.{os.getpid()}.tmp"  # the mode a plain write gives, as huggingface_hub's
        tmp.write_text(commit)
        os.replace(tmp, ref)
    except OSError:
        pass  # a read-only cache still works pinned to the commit; the ref is a convenience


#: Hub failures after which a cached snapshot answers instead (huggingface_hub's own fallback cases).
_CACHE_FALLBACK = ("hub-unreachable", "hub-offline")
#: Hub failures that also mean "not a local path either" is worth saying (a mistyped path looks like org/name).
_NEITHER = ("repo-not-found", "hub-unreachable", "hub-offline")


def open_repo(
    repo_id: str,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    repo_type: str = "model",
    token: str | bool | None = None,
):
    """``repo_id`` on the Hub (a :class:`~shardkit.hub.remote.HubRepo`), or its cached snapshot folder (a Path).

    The cache answers when ``HF_HUB_OFFLINE`` is set or the Hub can't be reached, provided it holds a snapshot
    of ``revision`` with a checkpoint in it. Otherwise raises :class:`~shardkit.errors.HubError` whose message
    says both that no such local path exists and what the Hub answered.
    """
    from ..errors import HubError
    from .http import hub_endpoint
    from .remote import HubRepo

    label = repo_id + (f"/{subfolder.strip('/')}" if subfolder else "") + (f"@{revision}" if revision else "")
    if hub_offline():
        failure = HubError(f"{label}: cannot reach {hub_endpoint()}: HF_HUB_OFFLINE is set", code="hub-offline")
    else:
        try:
            return HubRepo(repo_id, revision=revision, subfolder=subfolder, repo_type=repo_type, token=token)
        except HubError as exc:
            if exc.code not in _CACHE_FALLBACK:
                raise _neither(label, exc) from None
            failure = exc
    snapshot = cached_snapshot(repo_id, revision=revision, subfolder=subfolder, repo_type=repo_type)
    if snapshot is not None and _holds_checkpoint(snapshot):
        return snapshot
    raise _neither(label, failure, cache=True) from None


def _holds_checkpoint(folder: Path) -> bool:
    from ..naming import pick_checkpoint

    try:
        return pick_checkpoint([p.name for p in folder.iterdir() if p.is_file()], None) is not None
    except ValueError:  # several checkpoints: there is one to pick with a variant or a file name
        return True
    except OSError:
        return False


def _neither(label: str, exc, *, cache: bool = False):
    """``exc`` reworded to say that ``label`` is no local path either (and, with ``cache``, not cached)."""
    from ..errors import HubError

    if exc.code not in _NEITHER:
        return exc
    problem = str(exc)
    problem = problem[len(label) + 2 :] if problem.startswith(label + ": ") else problem
    message = f"{label}: no such local path; and the Hub: {problem}"
    if cache:
        message += "; and the local Hugging Face cache holds no checkpoint of it"
    return HubError(message, code=exc.code)
