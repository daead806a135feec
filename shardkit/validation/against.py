"""Local files against what the Hub (or the Hugging Face cache's own blob names) says their bytes are.

:func:`check_against` compares each checkpoint file of a local folder with a Hub repo's listing, without
downloading: size, then SHA-256 against the LFS object id (``lfs.oid`` in the tree listing), or the git blob id
for a small regular file (an index). :func:`check_cache_blobs` needs no network: a cache snapshot's files are
links to ``blobs/<etag>``, and the etag of an LFS file is its SHA-256 (of a regular file, its git blob id), so
each file is hashed and compared with its own blob's name. Both hash on all cores (:mod:`shardkit.hashing`).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ..errors import UsageError
from ..hashing import sha256_files_progress
from ..hub.http import hub_endpoint, is_hub_failure, translate
from ..naming import checkpoint_family
from .report import Report

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
#: Regular (non-LFS) files are compared by git blob id, which needs the whole file in memory: only small ones.
MAX_GIT_BLOB = 64 * 1024 * 1024


def parse_against(text: str) -> tuple[str, str | None]:
    """``org/name@revision`` -> ``("org/name", "revision")``; no ``@`` -> the default branch."""
    repo_id, _, revision = text.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise UsageError(f"--against {text!r}: expected a Hub repo id org/name, optionally @revision", code="usage")
    return repo_id, revision or None


def git_blob_id(path: str | os.PathLike) -> str:
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def check_against(
    folder: Path,
    against: str,
    report: Report,
    *,
    subfolder: str | None = None,
    repo_type: str = "model",
    token: str | bool | None = None,
    progress: bool = False,
) -> None:
    """Add ``hub-mismatch`` / ``hub-missing`` / ``local-missing`` findings for ``folder``'s checkpoint files.

    Checkpoint files are those named like one (shards, single files, indexes: every family, every variant) at
    the top of ``folder``; the repo's are those at the top of ``subfolder``. Raises
    :class:`~shardkit.errors.HubError` when the repo or revision cannot be listed.
    """
    from huggingface_hub import HfApi

    repo_id, revision = parse_against(against)
    label = against
    prefix = (subfolder or "").strip("/")
    api = HfApi(endpoint=hub_endpoint(), token=token)
    remote: dict[str, tuple[int, str | None, str]] = {}
    try:
        for item in api.list_repo_tree(
            repo_id, path_in_repo=prefix or None, revision=revision, repo_type=repo_type, recursive=False
        ):
            if not hasattr(item, "blob_id"):
                continue  # a folder
            name = item.path[len(prefix) + 1 :] if prefix else item.path
            lfs = getattr(item, "lfs", None)
            remote[name] = (item.size, lfs.sha256 if lfs else None, item.blob_id)
    except Exception as exc:
        if not is_hub_failure(exc):
            raise
        raise translate(exc, what=label, repo=label) from None

    local = sorted(entry.name for entry in os.scandir(folder) if entry.is_file() and checkpoint_family(entry.name) is not None)
    theirs = sorted(name for name in remote if checkpoint_family(name) is not None)
    for name in theirs:
        if name not in local:
            report.add("local-missing", f"the repo {against} has this checkpoint file and the folder does not.", file=name)
    present = [name for name in local if name in remote]
    for name in local:
        if name not in remote:
            report.add("hub-missing", f"the repo {against} has no such file (not uploaded yet?).", file=name)
    sized = []
    for name in present:
        size = os.path.getsize(folder / name)
        their_size = remote[name][0]
        if size != their_size:
            report.add(
                "hub-mismatch",
                f"{size} bytes here, {their_size} in {against} (a truncated or interrupted download?): download it again.",
                file=name,
            )
        else:
            sized.append(name)
    lfs = [n for n in sized if remote[n][1]]
    digests = sha256_files_progress([folder / n for n in lfs], progress=progress)
    for name in lfs:
        if digests[str(folder / name)] != remote[name][1]:
            report.add(
                "hub-mismatch", f"SHA-256 differs from the LFS object id in {against}: the bytes are not the repo's.", file=name
            )
    for name in sized:
        if not remote[name][1] and remote[name][0] <= MAX_GIT_BLOB and git_blob_id(folder / name) != remote[name][2]:
            report.add("hub-mismatch", f"content differs from the file in {against} (git blob id).", file=name)


def check_cache_blobs(folder: Path, report: Report, *, progress: bool = False) -> int:
    """Hash every file of a cache snapshot against its blob's name; add ``blob-mismatch`` findings. Files checked.

    Raises :class:`~shardkit.errors.UsageError` when ``folder``'s files are not links into a ``blobs`` folder.
    """
    links: dict[str, Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_symlink():
            continue
        target = Path(os.path.realpath(entry.path))
        if target.parent.name == "blobs" and (_SHA256.match(target.name) or _SHA1.match(target.name)):
            links[entry.name] = target
    if not links:
        raise UsageError(
            f"{folder}: not a Hugging Face cache snapshot (its files are not links to blobs/<hash>); "
            "nothing to verify blobs against",
            code="usage",
        )
    lfs = {name: blob for name, blob in links.items() if _SHA256.match(blob.name) and blob.is_file()}
    digests = sha256_files_progress(list(lfs.values()), progress=progress)
    for name, blob in links.items():
        if not blob.is_file():
            report.add("missing-file", "its blob is missing from the cache (an interrupted download).", file=name)
            continue
        if name in lfs:
            ok = digests[str(blob)] == blob.name
        else:
            ok = blob.stat().st_size > MAX_GIT_BLOB or git_blob_id(blob) == blob.name
        if not ok:
            report.add(
                "blob-mismatch",
                f"the bytes do not hash to their cache blob's name {blob.name[:12]}…: corrupted or cut short; "
                "delete the blob and download again.",
                file=name,
            )
    return len(links)
