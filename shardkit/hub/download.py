"""Download only a Hub repo's checkpoint files (the index and its shards, or the single file).

Files go through huggingface_hub's cache (``hf_hub_download``, with its progress bars), so a second run costs
nothing and other tools share the copy. ``split`` and ``convert`` use this for a repo-id source. When the Hub
can't be reached or ``HF_HUB_OFFLINE`` is set, a snapshot already in the cache is used, as huggingface_hub does.
"""

from __future__ import annotations

import os
from pathlib import Path


def download_checkpoint(
    repo_id: str,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    variant: str | None = None,
    repo_type: str = "model",
    token: str | bool | None = None,
    with_config: bool = False,
    other_files: bool = False,
) -> Path:
    """Download the checkpoint of ``repo_id`` and return the local folder holding it (a cache snapshot folder).

    Only the checkpoint's files are fetched (no tokenizer, no other format): the one ``transformers`` would load
    (``model.safetensors``, its index, ``pytorch_model.bin``, its index, ``variant`` applied). A shard the index
    names but the repo lacks fails before any shard is downloaded. The cache records ``revision`` (default main)
    as the commit, as huggingface_hub does. Raises :class:`~shardkit.errors.HubError` when the repo can't be
    reached and isn't cached, :class:`CheckpointError` when it holds no checkpoint or lacks a shard.
    ``with_config`` also fetches the repo's ``config.json`` (when it has one), which transforms read.
    ``other_files`` also fetches the folder's other files (config, tokenizer, README…: what
    :func:`shardkit.write.other_files.is_other_file` accepts), so that ``from_pretrained`` of the folder works.
    """
    from .cache import open_repo, write_ref

    repo = open_repo(repo_id, revision=revision, subfolder=subfolder, repo_type=repo_type, token=token)
    if isinstance(repo, Path):  # offline or unreachable: the cached snapshot
        return repo
    folder = fetch_checkpoint(repo, repo.select_checkpoint(variant))
    if with_config and repo.size("config.json") is not None:  # what transforms read: --dtype auto, --experts…
        fetch_files(repo, ["config.json"])
    if other_files:
        from ..write.other_files import is_other_file

        fetch_files(repo, sorted(name for name in repo.listing() if is_other_file(name)))
    write_ref(repo_id, revision, repo.commit, repo_type=repo.repo_type)
    return folder


def fetch_checkpoint(repo, selected: str, *, skip_missing: bool = False) -> Path:
    """Download the checkpoint ``selected`` of ``repo`` (the index first, then its shards); return the local folder.

    A shard named by the index but absent from the repo raises :class:`CheckpointError` naming it, before any
    shard is fetched, unless ``skip_missing`` (validate reports those itself and checks the rest).
    """
    from ..errors import CheckpointError
    from ..naming import INDEX_RE
    from ..reader import read_index

    folder, fetched = fetch_files(repo, [selected])
    assert folder is not None  # one file was fetched
    if INDEX_RE.match(os.path.basename(selected)):  # the cached index names the shards: nothing is fetched twice
        shards = sorted(set(read_index(folder / selected).weight_map.values()))
        for name in shards:
            repo.check_path(name)
        missing = [name for name in shards if repo.size(name) is None]
        if missing and not skip_missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(
                f"{repo.label}: {selected}",
                f"names {missing[0]!r}{more}, which the repo does not hold; nothing was downloaded",
                code="missing-shard",
            )
        _, more_fetched = fetch_files(repo, [name for name in shards if name not in missing])
        fetched += more_fetched
    repo.fetcher.count(fetched)
    return folder


def fetch_files(repo, names: list[str]) -> tuple[Path | None, int]:
    """Download ``names`` (relative to the repo's subfolder) at the repo's resolved commit.

    Returns the local folder that holds them (None for no names) and the bytes fetched (files already in the
    cache count 0).
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from .http import bounded_session, is_hub_failure, metadata_timeout, translate

    folder: Path | None = None
    fetched = 0
    for name in names:
        repo.check_path(name)
        filename = f"{repo.subfolder}/{name}" if repo.subfolder else name
        cached = try_to_load_from_cache(repo.repo_id, filename, revision=repo.commit, repo_type=repo.repo_type)
        if not isinstance(cached, str):
            repo.fetcher.probe(repo.url(name), name=name)  # a lost Hub fails here, at once
        try:
            with bounded_session():
                path = hf_hub_download(
                    repo.repo_id,
                    filename,
                    revision=repo.commit,
                    repo_type=repo.repo_type,
                    token=repo.token,
                    endpoint=repo.endpoint,
                    etag_timeout=metadata_timeout(),
                )
        except Exception as exc:
            if not is_hub_failure(exc):
                raise
            raise translate(exc, what=f"{repo.label}: {name}", repo=repo.label) from None
        if not isinstance(cached, str):
            fetched += os.path.getsize(path)
        local_folder = Path(path[: -len(name)].rstrip("/\\")) if path.endswith(name) else Path(path).parent
        folder = folder or local_folder
    return folder, fetched
