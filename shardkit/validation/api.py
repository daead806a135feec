"""``shardkit.validate()``: prove that a local checkpoint or a Hub repo is sound, from headers alone by default."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..formats.dcp import dcp_folder
from ..naming import select_checkpoint
from ..sources import LocalFolder, Source, is_hub_id, open_source
from .checks import check_checkpoint
from .dcp import check_dcp, is_dcp_target
from .report import Report

if TYPE_CHECKING:
    from ..table import Checkpoint


def validate(
    target: str | os.PathLike,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    variant: str | None = None,
    repo_type: str = "model",
    token: str | bool | None = None,
    deep: bool = False,
    checksums: str | os.PathLike | None = None,
    model_config: str | os.PathLike | bool | None = None,
    against: str | None = None,
    verify_blobs: bool = False,
    progress: bool = False,
) -> Report:
    """Check the checkpoint at ``target`` and return every problem found as a :class:`Report`.

    ``target`` is a checkpoint file, an index file, a folder (or Hugging Face cache folder) holding one, or a Hub
    repo id ``org/name`` (when no such local path exists; ``revision``, ``subfolder``, ``repo_type`` and
    ``token`` apply to it, the token defaulting to huggingface_hub's usual places). Only headers are read unless
    ``deep`` (tensor data: NaN/Inf/all-zero) or ``checksums`` (a manifest of per-tensor SHA-256: compared when the
    file exists, written otherwise) asks for data; for a Hub repo these download the checkpoint files first.
    ``model_config`` (a config.json path, or True for the config.json beside the checkpoint) builds the model on
    the meta device with transformers and compares parameter names and shapes. ``progress`` shows a bar on a
    terminal while tensor data is read (and hashed for ``against``/``verify_blobs``).

    ``against`` (``org/name[@revision]``, local targets only) compares every checkpoint file's size and SHA-256 with
    the repo's listing (LFS object ids), without downloading: ``hub-mismatch``, ``hub-missing``, ``local-missing``.
    ``verify_blobs`` hashes a Hugging Face cache snapshot's files against their blobs' names (``blob-mismatch``),
    offline.

    Problems of the checkpoint become findings; only a target that cannot be read at all raises: a
    :class:`~shardkit.errors.CheckpointError` for no such path or no checkpoint in it, a
    :class:`~shardkit.errors.HubError` for a missing or gated repo, no access or no network.
    """
    label = os.fspath(target)
    local = Path(label)
    from_cache = None
    source: Source
    selected: str | None
    if not is_hub_id(label) and local.exists() and is_dcp_target(local):
        source, selected, whole_folder = LocalFolder(dcp_folder(local)), None, False
    else:
        source = open_source(label, revision=revision, subfolder=subfolder, repo_type=repo_type, token=token)
        if isinstance(source, LocalFolder):
            from_cache = source.from_cache
        if isinstance(source, LocalFolder) and source.selected is not None:
            # A file: an index is checked with its folder, a single checkpoint file on its own.
            selected, whole_folder = source.selected, source.selected.endswith(".json")
        else:
            local_folder = isinstance(source, LocalFolder) and from_cache is None
            selected, whole_folder = _select(source, source.label if local_folder else label, variant), True

    report = Report(target=label, checkpoint=selected, from_cache=from_cache)
    if selected is None:  # a DCP training checkpoint
        checkpoint = check_dcp(local, report)
    else:
        checkpoint = check_checkpoint(source, selected, report, whole_folder=whole_folder, variant=variant)
    if deep or checksums:
        checkpoint = _check_data(source, selected, checkpoint, report, deep=deep, checksums=checksums, progress=progress)
    if checkpoint is not None:
        _check_tied(source, checkpoint, report, model_config)
    if checkpoint is not None and model_config:
        from .model import check_model

        config = _config_path(source, model_config)
        try:
            check_model(checkpoint, config, report)
        finally:
            if config and source.folder is None and model_config in (True, "auto"):
                shutil.rmtree(os.path.dirname(config), ignore_errors=True)  # fetched from the Hub into a temp folder
    folder = source.folder
    if against or verify_blobs:
        from .against import check_against, check_cache_blobs

        if folder is None:
            raise UsageError(
                f"{label}: --against and --verify-blobs compare local files; this target is a Hub repo", code="usage"
            )
        if verify_blobs:
            check_cache_blobs(Path(folder), report, progress=progress)
        if against:
            check_against(Path(folder), against, report, repo_type=repo_type, token=token, progress=progress)
    if report.files_checked == 0 and report.ok:
        why = " (a legacy torch file is checked only downloaded: pass --deep)" if "not-checked" in report.codes else ""
        report.add("nothing-checked", f"no checkpoint file could be read, so nothing was checked{why}.", file=selected)
    report.bytes_downloaded = source.bytes_downloaded
    report.server_ignored_range = bool(getattr(getattr(source, "fetcher", None), "range_ignored", False))
    return report


def _check_data(
    source, selected: str | None, checkpoint: Checkpoint | None, report: Report, *, deep: bool, checksums, progress: bool
) -> Checkpoint | None:
    """``--deep`` and ``--checksums``: read the tensor data (a Hub repo's checkpoint is downloaded first).

    Returns the table the data was read from. A run that read no tensor at all is an error, never sound.
    """
    from .deep import check_data

    unchecked = {f.file for f in report.findings if f.code == "not-checked"}
    folder = source.folder
    if folder is None and selected is not None and (checkpoint is not None or unchecked):  # a Hub repo: download
        folder, checkpoint, downloaded = _download(source, selected)
        # The downloaded copy was checked again: what only it could see (files not checkable remotely, symlinks
        # of the cache) is kept; what both saw is listed once.
        report.findings = [f for f in report.findings if f.code != "not-checked"]
        seen = {(f.code, f.file, f.tensor) for f in report.findings}
        report.findings += [f for f in downloaded.findings if (f.code, f.file, f.tensor) not in seen]
        report.files_checked = max(report.files_checked, downloaded.files_checked)
        report.tensors_checked = max(report.tensors_checked, downloaded.tensors_checked)
    scanned = 0
    if checkpoint is not None:
        from ..progress import byte_bar, threadsafe_update

        what = "checking tensors" if deep else "hashing tensors"
        bar = byte_bar(sum(e.nbytes for e in checkpoint.stored), enabled=progress, desc=what)
        try:
            scanned = check_data(
                checkpoint, report, nan_inf_zero=deep, checksums=checksums, relative_to=folder, progress=threadsafe_update(bar)
            )
        finally:
            if bar is not None:
                bar.close()
    if not scanned and report.ok:  # when errors explain it, one more would only repeat them
        what = "--deep" if deep else "--checksums"
        written = " and no checksum manifest was written" if checksums and not os.path.exists(checksums) else ""
        report.add("nothing-checked", f"{what} read no tensor data{written}.", file=selected)
    return checkpoint


def _check_tied(source, checkpoint, report: Report, model_config) -> None:
    """Tied weights against the config.json given with ``model_config`` or beside a local checkpoint."""
    import json

    from .tied import check_tied

    folder = source.folder
    if model_config not in (None, False, True, "auto"):
        path = os.fspath(model_config)
    elif folder is not None:
        path = os.path.join(folder, "config.json")
    else:
        return  # a Hub repo: its config is fetched only with --model-config
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return
    # With --model-config, a missing head is the model check's model-missing-key already.
    check_tied(checkpoint, config, report, read_bytes=folder is not None, head_expected=not model_config)


def _select(source: Source, label: str, variant: str | None) -> str:
    return select_checkpoint(list(source.listing()), label, variant, hint="; pass the file or index to validate")


def _download(source, selected: str):
    """Download a Hub repo's checkpoint files into the Hugging Face cache (shards absent from the repo skipped).

    Returns the local folder, the checkpoint's table read from it (None if unreadable) and the report of that
    local header check (whose findings repeat the remote ones, except for files not checkable remotely).
    """
    from ..hub.download import fetch_checkpoint

    folder = fetch_checkpoint(source, selected, skip_missing=True)
    local = Report(target=str(folder))
    return str(folder), check_checkpoint(LocalFolder(folder), selected, local, whole_folder=False), local


def _config_path(source, model_config) -> str | None:
    """The config.json to build the model from: the one given, or the one beside the checkpoint."""
    if model_config is not True and str(model_config) != "auto":
        return os.fspath(model_config)
    return source.fetch_config()
