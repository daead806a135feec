"""Download only a Hub repo's checkpoint files (the index and its shards, or the single file).

Files go through huggingface_hub's cache (``hf_hub_download``, with its progress bars), so a second run costs
nothing and other tools share the copy. ``split`` and ``convert`` use this for a repo-id source.
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
) -> Path:
    """Download the checkpoint of ``repo_id`` and return the local folder holding it (a cache snapshot folder).

    Only the checkpoint's files are fetched (no tokenizer, no other format): the one ``transformers`` would load
    (``model.safetensors``, its index, ``pytorch_model.bin``, its index, ``variant`` applied). Raises
    :class:`~shardkit.errors.HubError` when the repo can't be reached and :class:`CheckpointError` when it
    holds no checkpoint.
    """
    from ..naming import INDEX_RE
    from ..reader import read_index
    from .remote import HubRepo

    repo = HubRepo(repo_id, revision=revision, subfolder=subfolder, repo_type=repo_type, token=token)
    selected = repo.select_checkpoint(variant)
    folder, _ = fetch_files(repo, [selected])
    if INDEX_RE.match(selected):  # the cached index names the shards: nothing is fetched twice
        shards = sorted(set(read_index(folder / selected).weight_map.values()))
        fetch_files(repo, shards)
    return folder


def fetch_files(repo, names: list[str]) -> tuple[Path, int]:
    """Download ``names`` (relative to the repo's subfolder) at the repo's resolved commit.

    Returns the local folder that holds them and the bytes fetched (files already in the cache count 0).
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    from .http import is_hub_failure, translate

    folder, fetched = None, 0
    for name in names:
        repo.check_path(name)
        filename = f"{repo.subfolder}/{name}" if repo.subfolder else name
        cached = try_to_load_from_cache(repo.repo_id, filename, revision=repo.commit, repo_type=repo.repo_type)
        try:
            path = hf_hub_download(
                repo.repo_id, filename, revision=repo.commit, repo_type=repo.repo_type, token=repo.token, endpoint=repo.endpoint
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
