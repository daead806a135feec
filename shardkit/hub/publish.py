"""Publish a checkpoint folder to a Hub repo in one commit that swaps the old layout for the new one.

:func:`plan_push` is read-only: it validates the folder, reads the repo's listing (LFS SHA-256 included) and
decides, per file, what the commit does:

- ``add`` a path the repo lacks, ``replace`` a path whose bytes differ, skip an ``unchanged`` one (same
  SHA-256 as the repo's LFS oid, or same git blob id for a small regular file);
- ``delete`` the repo's checkpoint files that the new layout no longer uses: files of the same family (stem,
  variant and format, in the same folder: ``model-0000i-of-0000n.safetensors``, ``model.safetensors`` and
  ``model.safetensors.index.json``) that the folder does not hold, and with ``delete_bin`` the ``.bin`` family
  a safetensors conversion replaces (``pytorch_model*.bin`` and its index);
- ``keep`` everything else (README, config, tokenizer, other variants and formats).

:func:`push` carries the plan out with huggingface_hub's commit API: every new file is uploaded first (LFS, or
Xet where huggingface_hub uses it), then one commit adds, replaces and deletes, with ``parent_commit`` set to the
revision the plan was made against, so a branch that moved in between makes the commit fail rather than delete
someone else's files. Until that commit the repo is unchanged; uploaded objects stay on the Hub, so a rerun
after a failure sends only what is missing.

A commit holds at most :data:`MAX_COMMIT_OPERATIONS` operations and :data:`MAX_INLINE_BYTES` of regular (non-LFS)
content. A folder beyond that is pushed in several commits: the files outside the checkpoint first, in batches
(each commit leaves the repo loadable, since the old checkpoint is still whole), then one commit with every
checkpoint file and every deletion. A checkpoint that alone exceeds one commit is refused (``push-too-large``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import CheckpointError, HubError, ShardkitError
from ..hashing import sha256_files_progress
from ..naming import checkpoint_family
from .http import hub_endpoint, is_hub_failure, network_errors, translate

#: huggingface_hub documents 25k LFS files per commit; stay well below.
MAX_COMMIT_OPERATIONS = 20_000
#: Regular files travel base64-encoded inside the commit request, whose payload the Hub caps at 1 GB.
MAX_INLINE_BYTES = 500 * 1024 * 1024
#: Files the Hub stores as LFS whatever their content start with (the preupload endpoint decides the rest).
REGULAR_SIZE_LIMIT = 10 * 1024 * 1024
#: Never uploaded: git metadata and huggingface_hub's local upload cache.
IGNORED_DIRS = (".git", ".cache")

Action = Literal["add", "replace", "unchanged", "delete", "keep"]


class PushError(ShardkitError):
    """Publishing failed or was refused; the repo was left as it was."""

    code = "push-failed"


@dataclass(slots=True)
class FileAction:
    """What the commit does with one path of the repo (``local`` is None for deletions and kept files)."""

    path: str
    action: Action
    size: int
    sha256: str | None = None
    local: str | None = None
    checkpoint: bool = False

    def to_dict(self) -> dict:
        return {"path": self.path, "action": self.action, "size": self.size, "sha256": self.sha256}


@dataclass
class PushPlan:
    """Everything :func:`push` will do, decided before any write (``--dry-run`` prints it)."""

    folder: str
    repo_id: str
    repo_type: str
    revision: str
    create_pr: bool
    repo_exists: bool
    parent_commit: str | None
    files: list[FileAction] = field(default_factory=list)
    validation: dict | None = None
    commits: int = 1

    def by(self, action: Action) -> list[FileAction]:
        return [f for f in self.files if f.action == action]

    @property
    def upload_bytes(self) -> int:
        return sum(f.size for f in self.files if f.action in ("add", "replace"))

    def to_dict(self) -> dict:
        return {
            "folder": self.folder,
            "repo_id": self.repo_id,
            "repo_type": self.repo_type,
            "revision": self.revision,
            "create_pr": self.create_pr,
            "create_repo": not self.repo_exists,
            "parent_commit": self.parent_commit,
            "commits": self.commits,
            "upload_bytes": self.upload_bytes,
            **{action: [f.to_dict() for f in self.by(action)] for action in ("add", "replace", "unchanged", "delete")},
            "keep": [f.path for f in self.by("keep")],
            "validation": self.validation,
        }


@dataclass
class PushResult:
    plan: PushPlan
    commit_url: str | None = None
    commit_oid: str | None = None
    pr_url: str | None = None
    dry_run: bool = False

    def to_dict(self) -> dict:
        return {
            **self.plan.to_dict(),
            "dry_run": self.dry_run,
            "commit_url": self.commit_url,
            "commit_oid": self.commit_oid,
            "pull_request_url": self.pr_url,
        }


# -- checkpoint families ----------------------------------------------------------------------------------------


def bin_family(family: tuple[str, str, str]) -> tuple[str, str, str] | None:
    """The ``.bin`` family a safetensors family replaces: ``model`` -> ``pytorch_model``, others keep their stem."""
    folder, stem, suffix = family
    if suffix != ".safetensors":
        return None
    if stem == "model" or stem.startswith("model."):
        stem = "pytorch_" + stem
    return folder, stem, ".bin"


# -- planning ---------------------------------------------------------------------------------------------------


def local_files(folder: Path) -> dict[str, Path]:
    """``{path relative to folder, /-separated: path}`` of every regular file, git and cache folders left out."""
    files = {}
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in IGNORED_DIRS)
        for name in sorted(names):
            path = Path(root) / name
            if path.is_file():
                files[path.relative_to(folder).as_posix()] = path
    return files


def plan_push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    repo_type: str = "model",
    token: str | None = None,
    path_in_repo: str = "",
    create: bool = False,
    create_pr: bool = False,
    delete_bin: bool = False,
    force: bool = False,
    progress: bool = False,
    api=None,
) -> PushPlan:
    """Validate ``folder`` and decide what pushing it to ``repo_id`` does; nothing is written anywhere.

    Raises :class:`~shardkit.errors.CheckpointError` for a folder without a checkpoint, :class:`PushError`
    (``push-invalid-checkpoint``) when validation finds errors and ``force`` is false, and
    :class:`~shardkit.errors.HubError` for a repo or revision that does not exist (unless ``create``; a missing
    revision is never created) or cannot be read.
    """
    from ..validation import validate

    root = Path(folder)
    if not root.is_dir():
        raise CheckpointError(root, "no such folder" if not root.exists() else "is not a folder", code="missing-file")
    report = validate(root)  # raises no-checkpoint for a folder without one
    validation = {"verdict": report.verdict, "errors": [f.to_dict() for f in report.errors]}
    if report.errors and not force:
        first = report.errors[0]
        where = f"{first.file}: " if first.file else ""
        raise PushError(
            f"{root}: validation found {len(report.errors)} error(s), first {first.code}: {where}{first.message} "
            "(run `shardkit validate` for all; --force uploads anyway)",
            code="push-invalid-checkpoint",
        )

    api = api or _api(token)
    prefix = path_in_repo.strip("/")
    branch = revision or "main"
    exists, parent, remote = _remote_state(api, repo_id, repo_type, branch, prefix, create=create, label=repo_id)
    if revision and not exists:
        raise HubError(
            f"{repo_id}: cannot push to revision {revision!r} of a repo that does not exist yet", code="revision-not-found"
        )

    local = {f"{prefix}/{rel}" if prefix else rel: path for rel, path in local_files(root).items()}
    digests = sha256_files_progress(list(local.values()), progress=progress)
    plan = PushPlan(str(root), repo_id, repo_type, branch, create_pr, exists, parent, validation=validation)
    families = {checkpoint_family(p) for p in local} - {None}
    for path, source in local.items():
        size, digest = source.stat().st_size, digests[str(source)]
        theirs = remote.get(path)
        action: Action = "add"
        if theirs is not None:
            action = "unchanged" if _same(source, size, digest, theirs) else "replace"
        plan.files.append(FileAction(path, action, size, digest, str(source), checkpoint_family(path) in families))
    doomed = set(families)
    if delete_bin:
        doomed |= {bin_family(f) for f in families} - {None}
    for path, (size, _, _) in sorted(remote.items()):
        if path in local:
            continue
        family = checkpoint_family(path)
        action = "delete" if family in doomed else "keep"
        plan.files.append(FileAction(path, action, size, checkpoint=family is not None))
    plan.commits = len(split_commits(plan))
    return plan


def _api(token: str | None):
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub_endpoint(), token=token)


def _remote_state(api, repo_id: str, repo_type: str, branch: str, prefix: str, *, create: bool, label: str):
    """``(exists, head commit, {path: (size, lfs sha256 or None, git oid)})`` of the repo at ``branch``."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = api.repo_info(repo_id, revision=branch, repo_type=repo_type)
    except RevisionNotFoundError:
        raise HubError(
            f"{repo_id}: no branch or revision {branch!r} (create the branch first, e.g. `hf repo branch create`)",
            code="revision-not-found",
        ) from None
    except RepositoryNotFoundError:
        if create:
            return False, None, {}
        raise HubError(
            f"{repo_id}: no such {repo_type} repo on {hub_endpoint()}, or the token cannot see it (--create creates it)",
            code="repo-not-found",
        ) from None
    except Exception as exc:
        if not is_hub_failure(exc):
            raise
        raise translate(exc, what=label, repo=label) from None
    remote = {}
    try:
        for item in api.list_repo_tree(
            repo_id, path_in_repo=prefix or None, recursive=True, revision=info.sha, repo_type=repo_type
        ):
            if getattr(item, "size", None) is None or not hasattr(item, "blob_id"):
                continue  # a folder
            lfs = getattr(item, "lfs", None)
            remote[item.path] = (item.size, lfs.sha256 if lfs else None, item.blob_id)
    except Exception as exc:
        from huggingface_hub.errors import EntryNotFoundError

        if isinstance(exc, EntryNotFoundError) or type(exc).__name__ == "RemoteEntryNotFoundError":
            pass  # the subfolder does not exist yet
        elif is_hub_failure(exc):
            raise translate(exc, what=label, repo=label) from None
        else:
            raise
    return True, info.sha, remote


def _same(source: Path, size: int, digest: str, theirs: tuple[int, str | None, str]) -> bool:
    their_size, their_sha256, their_oid = theirs
    if size != their_size:
        return False
    if their_sha256 is not None:
        return digest == their_sha256
    if size > REGULAR_SIZE_LIMIT:
        return False
    import hashlib

    data = source.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == their_oid


def split_commits(plan: PushPlan) -> list[list[FileAction]]:
    """The commits :func:`push` makes: one unless the folder exceeds a commit's limits (see the module doc).

    Non-checkpoint uploads go first in batches; the last commit holds every checkpoint change and deletion.
    """
    changes = [f for f in plan.files if f.action in ("add", "replace", "delete")]

    def fits(batch: list[FileAction]) -> bool:
        inline = sum(f.size for f in batch if f.action != "delete" and f.size <= REGULAR_SIZE_LIMIT)
        return len(batch) <= MAX_COMMIT_OPERATIONS and inline * 4 // 3 <= MAX_INLINE_BYTES

    if fits(changes):
        return [changes]
    final = [f for f in changes if f.checkpoint or f.action == "delete"]
    if not fits(final):
        raise PushError(
            f"{plan.folder}: the checkpoint alone needs {len(final)} file operations, more than one commit holds "
            f"({MAX_COMMIT_OPERATIONS}): reshard into fewer, larger shards",
            code="push-too-large",
        )
    batches: list[list[FileAction]] = [[]]
    for f in changes:
        if f in final:
            continue
        if not fits(batches[-1] + [f]):
            batches.append([])
        batches[-1].append(f)
    return [b for b in batches if b] + [final]


# -- pushing ----------------------------------------------------------------------------------------------------


def push(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    dry_run: bool = False,
    **plan_options,
) -> PushResult:
    """Publish the checkpoint in ``folder`` to ``repo_id`` (see the module doc); the :class:`PushResult`.

    ``plan_options`` are :func:`plan_push`'s (``revision``, ``repo_type``, ``path_in_repo``, ``create``,
    ``create_pr``, ``delete_bin``, ``force``, ``progress``). ``dry_run`` stops after the plan. Otherwise a token
    is required (``token``, else huggingface_hub's: ``HF_TOKEN`` or the saved login); ``create`` creates a
    missing repo (``private`` applies to it); ``create_pr`` opens a pull request (``refs/pr/N``) against
    ``revision`` instead of committing to it. Errors are :class:`~shardkit.errors.ShardkitError` s with codes
    from the catalogue (``push-*``, ``repo-*``); after any of them the repo is as it was (for a multi-commit
    push, the message says which batches landed).
    """
    if not dry_run:
        token = _require_token(token)
    api = _api(token)
    plan = plan_push(folder, repo_id, token=token, api=api, **plan_options)
    repo_type, create_pr, progress = plan.repo_type, plan.create_pr, plan_options.get("progress", False)
    result = PushResult(plan, dry_run=dry_run)
    if dry_run:
        return result
    if not progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if not plan.repo_exists:
        _call(lambda: api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True), repo_id, stage="create")
        plan.parent_commit = _call(lambda: api.repo_info(repo_id, repo_type=repo_type).sha, repo_id, stage="create")
    batches = split_commits(plan)
    if not any(batches[-1]) and len(batches) == 1:
        return result  # nothing changed: no empty commit
    message = commit_message or _default_message(plan)
    parent = plan.parent_commit
    for number, batch in enumerate(batches, 1):
        last = number == len(batches)
        title = message if last else f"{message} (part {number} of {len(batches)}: files outside the checkpoint)"
        info = _call(
            lambda batch=batch, title=title, parent=parent, last=last: api.create_commit(
                repo_id,
                _operations(batch),
                commit_message=title,
                commit_description=commit_description,
                repo_type=repo_type,
                revision=plan.revision,
                create_pr=create_pr and last,
                parent_commit=parent,
            ),
            repo_id,
            stage="commit",
            landed=number - 1,
            total=len(batches),
        )
        parent = None if create_pr else info.oid
    result.commit_url, result.commit_oid = info.commit_url, info.oid
    result.pr_url = getattr(info, "pr_url", None)
    return result


def _require_token(token: str | None) -> str:
    if token:
        return token
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise PushError(
            "no Hub token: pass --token, set HF_TOKEN, or run `hf auth login` (a token with write access)",
            code="push-no-token",
        )
    return found


def _operations(batch: list[FileAction]) -> list:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    ops = []
    for f in batch:
        if f.action == "delete":
            ops.append(CommitOperationDelete(path_in_repo=f.path))
            continue
        op = CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=f.local)
        if f.sha256 and hasattr(op.upload_info, "sha256"):
            try:  # hashed already, on all cores: spare huggingface_hub a second pass over the file
                op.upload_info.sha256 = bytes.fromhex(f.sha256)
            except AttributeError:  # an older UploadInfo without a setter
                pass
        ops.append(op)
    return ops


def _default_message(plan: PushPlan) -> str:
    added = len(plan.by("add")) + len(plan.by("replace"))
    deleted = len(plan.by("delete"))
    text = f"Upload checkpoint with shardkit ({added} file(s)"
    return text + (f", {deleted} stale file(s) deleted)" if deleted else ")")


def _call(function, repo_id: str, *, stage: str, landed: int = 0, total: int = 1):
    """Run a huggingface_hub call, turning its failures into one-line errors that say what state the repo is in."""
    try:
        return function()
    except ShardkitError:
        raise
    except Exception as exc:
        hub_exc = _hub_cause(exc)
        if hub_exc is None:
            raise
        state = (
            "the repo is unchanged"
            if landed == 0
            else f"{landed} of {total} commits (files outside the checkpoint) landed, the checkpoint is unchanged"
        )
        resume = "; rerun the same command to resume (uploaded files are not sent again)"
        status = getattr(getattr(hub_exc, "response", None), "status_code", None)
        if status in (409, 412):
            raise PushError(
                f"{repo_id}: the branch moved while pushing; nothing was committed, {state}: rerun", code="push-conflict"
            ) from None
        error = translate(hub_exc, what=repo_id, repo=repo_id)
        if error.code in ("hub-http-error", "hub-error", "hub-unreachable") and stage == "commit":
            what = "cannot reach the Hub" if isinstance(hub_exc, network_errors()) else str(error).split(": ", 1)[-1]
            raise PushError(f"{repo_id}: upload failed ({what}); {state}{resume}", code="push-failed") from None
        raise HubError(f"{error}; {state}", code=error.code) from None


def _hub_cause(exc: BaseException) -> BaseException | None:
    """The first exception in ``exc``'s chain that reports the Hub or the network (huggingface_hub wraps them)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if is_hub_failure(exc):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


__all__ = ["PushPlan", "PushResult", "FileAction", "PushError", "plan_push", "push", "checkpoint_family"]
