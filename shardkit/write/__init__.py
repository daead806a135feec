"""The library face of ``shardkit split`` and ``shardkit convert``: plan, write into staging, verify, publish.

:func:`split` and :func:`convert` take a path, a Hub repo id or an open :class:`~shardkit.table.Checkpoint`, with
explicit keyword arguments, and return a :class:`WriteSummary`. ``run_split``/``run_convert`` are deprecated aliases.
"""

from __future__ import annotations

import errno
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Union

from ..dtypes import CAST_CHOICES_TEXT, parse_dtype
from ..errors import OutputError, UsageError
from ..fileio import write_all
from ..naming import OutputFormat
from ..progress import byte_bar
from ..reader import open_checkpoint
from ..table import Checkpoint
from ..units import parse_size
from .other_files import copy_other_files, find_other_files, source_folder
from .plan import Plan, plan_convert, plan_split
from .staging import Staging, check_destination, refuse_inside
from .transforms import ExpertLayout, Transformed, Transforms, read_config, transform

DEFAULT_MAX_SHARD_SIZE = "5GB"

#: Test hook: seconds to sleep after each finished output file, so tests can kill a run mid-write.
_STALL_ENV = "SHARDKIT_TEST_STALL_AFTER_FILE"


@dataclass
class WriteSummary:
    """What a split or convert wrote (or, with ``dry_run``, would write)."""

    source: str
    destination: str
    format: str
    files: list[dict] = field(default_factory=list)  # {"name", "size", "tensors"} per checkpoint file, in order
    index: str | None = None
    tensors: int = 0  # stored tensors
    names: int = 0  # names in the output, dropped aliases excluded
    total_size: int = 0  # tensor bytes: the index's metadata.total_size
    dropped: dict[str, str] = field(default_factory=dict)  # aliases recorded in metadata, not stored
    other_files: list[str] = field(default_factory=list)  # config, tokenizer… copied from the source's folder
    #: with transforms: ``[{"from": [source names], "to": output name, "how": ...}]`` (``--dry-run`` prints it)
    mapping: list[dict] | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was chosen for the user (a DCP source's model group)
    materialized: int = 0  # tensors that went through torch (casts, views, legacy files)
    verified: bool = False
    dry_run: bool = False
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


Source = Union[str, "os.PathLike[str]", Checkpoint]


def split(
    src: Source,
    dst: str | os.PathLike[str],
    *,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    format: OutputFormat = "safetensors",
    dtype: str | None = None,
    overwrite: bool = False,
    verify: bool = False,
    dry_run: bool = False,
    progress: bool = False,
    weights_only: bool = False,
    select: Sequence[str] = (),
    drop: Sequence[str] = (),
    rename: Sequence[str] = (),
    strip_prefix: Sequence[str] = (),
    keep_dtype: Sequence[str] = (),
    dequantize: str | None = None,
    experts: ExpertLayout | None = None,
    tie: bool = False,
    untie: bool = False,
    transforms: Transforms | None = None,
    config: dict | None = None,
    variant: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    repo_type: str = "model",
    token: str | bool | None = None,
) -> WriteSummary:
    """Reshard ``src`` into ``dst`` with shards of at most ``max_shard_size``, packed the way huggingface_hub
    shards (next-fit in key order; a larger tensor gets a shard of its own).

    ``src`` is a checkpoint path (file, index, folder, Hugging Face cache folder), a Hub repo id ``org/name``
    (only its checkpoint files are downloaded, into the Hugging Face cache; ``revision``, ``subfolder``,
    ``repo_type`` and ``token`` apply) or an open :class:`~shardkit.table.Checkpoint`. ``variant`` picks
    ``model.<variant>.safetensors`` and friends. ``format`` is ``"safetensors"`` or ``"bin"``.

    Transforms (see :mod:`shardkit.write.transforms`), applied before planning: ``select``/``drop`` (glob or
    ``re:`` patterns), ``rename`` (``REGEX=REPLACEMENT`` rules in order), ``strip_prefix``, ``dtype`` (``bf16``,
    ``fp16``, ``fp32``, ``fp64`` or ``"auto"`` from config.json) with ``keep_dtype`` patterns, ``dequantize``
    (block-FP8 to bf16/fp16/fp32), ``experts`` (``"packed"`` or ``"per-expert"``), ``tie``/``untie``; or all of
    them as one ``transforms`` object (not both). ``config`` is the parsed config.json (default: the one beside
    the checkpoint). ``overwrite``, ``verify``, ``dry_run``, ``progress``: see :func:`write`. The model's other
    files beside ``src`` (config, tokenizer…; a Hub repo's are fetched) go into ``dst`` too unless ``weights_only``.
    """
    checkpoint = open_any(
        src,
        variant=variant,
        revision=revision,
        subfolder=subfolder,
        repo_type=repo_type,
        token=token,
        headers_only=dry_run,
        other_files=not weights_only,
    )
    given: dict[str, Any] = {"select": select, "drop": drop, "rename": rename, "strip_prefix": strip_prefix}
    given.update(keep_dtype=keep_dtype)
    given.update(dequantize=dequantize, experts=experts, tie=tie, untie=untie)
    transformed, notes = _transform(checkpoint, dtype, transforms, config, given)
    plan = plan_split(transformed.checkpoint, parse_size(max_shard_size), format, transformed.dtypes)
    return write(
        checkpoint,
        plan,
        dst,
        overwrite=overwrite,
        verify=verify,
        dry_run=dry_run,
        progress=progress,
        weights_only=weights_only,
        transformed=transformed,
        notes=notes,
    )


def convert(
    src: Source,
    dst: str | os.PathLike[str],
    *,
    max_shard_size: int | str | None = None,
    format: OutputFormat = "safetensors",
    dtype: str | None = None,
    overwrite: bool = False,
    verify: bool = False,
    dry_run: bool = False,
    progress: bool = False,
    weights_only: bool = False,
    select: Sequence[str] = (),
    drop: Sequence[str] = (),
    rename: Sequence[str] = (),
    strip_prefix: Sequence[str] = (),
    keep_dtype: Sequence[str] = (),
    dequantize: str | None = None,
    experts: ExpertLayout | None = None,
    tie: bool = False,
    untie: bool = False,
    transforms: Transforms | None = None,
    config: dict | None = None,
    variant: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    repo_type: str = "model",
    token: str | bool | None = None,
) -> WriteSummary:
    """Rewrite ``src`` (typically ``.bin`` files) in ``format`` keeping its file layout: each source file becomes
    one output file. With ``max_shard_size`` it is repacked instead, exactly as :func:`split` does.

    ``src`` and every other argument are as for :func:`split`. A DCP checkpoint has no layout worth keeping (its
    tensors span the ranks' files): it is repacked into shards of :data:`DEFAULT_MAX_SHARD_SIZE`.
    """
    options: dict[str, Any] = dict(overwrite=overwrite, verify=verify, dry_run=dry_run, progress=progress)
    options.update(weights_only=weights_only)
    given: dict[str, Any] = {"select": select, "drop": drop, "rename": rename, "strip_prefix": strip_prefix}
    given.update(keep_dtype=keep_dtype)
    given.update(dequantize=dequantize, experts=experts, tie=tie, untie=untie)
    checkpoint = open_any(
        src,
        variant=variant,
        revision=revision,
        subfolder=subfolder,
        repo_type=repo_type,
        token=token,
        headers_only=dry_run,
        other_files=not weights_only,
    )
    if max_shard_size is None and checkpoint.format == "dcp":
        max_shard_size = DEFAULT_MAX_SHARD_SIZE
    if max_shard_size is not None:
        return split(
            checkpoint,
            dst,
            max_shard_size=max_shard_size,
            format=format,
            dtype=dtype,
            transforms=transforms,
            config=config,
            **given,
            **options,
        )
    transformed, notes = _transform(checkpoint, dtype, transforms, config, given)
    plan = plan_convert(transformed.checkpoint, format, transformed.dtypes)
    return write(checkpoint, plan, dst, transformed=transformed, notes=notes, **options)


def open_any(
    src: Source,
    *,
    variant: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    repo_type: str = "model",
    token: str | bool | None = None,
    headers_only: bool = False,
    other_files: bool = False,
) -> Checkpoint:
    """``src`` as a :class:`Checkpoint`: itself when it is one, the table of a local path when that exists, else the
    table of a Hub repo's checkpoint downloaded into the Hugging Face cache (only its checkpoint files, and with
    ``other_files`` the model's other small files), or with ``headers_only`` (a dry run) read from the repo's
    headers by HTTP ranges, nothing downloaded."""
    if isinstance(src, Checkpoint):
        return src
    from ..sources import is_hub_id, open_source, read_table

    if is_hub_id(src) and not headers_only:
        from ..hub.download import download_checkpoint

        folder = download_checkpoint(
            os.fspath(src),
            revision=revision,
            subfolder=subfolder,
            variant=variant,
            repo_type=repo_type,
            token=token,
            with_config=True,  # transforms read it (--dtype auto, --experts, --dequantize's block size)
            other_files=other_files,
        )
        return open_checkpoint(folder, variant=variant)
    return read_table(open_source(src, revision=revision, subfolder=subfolder, repo_type=repo_type, token=token), variant)


def run_split(checkpoint: Checkpoint, dst, **options) -> WriteSummary:
    """Deprecated alias of :func:`split`, which takes an open :class:`Checkpoint` too."""
    warnings.warn("shardkit.run_split is deprecated: call shardkit.split, which takes a Checkpoint", DeprecationWarning, 2)
    return split(checkpoint, dst, **options)


def run_convert(checkpoint: Checkpoint, dst, **options) -> WriteSummary:
    """Deprecated alias of :func:`convert`, which takes an open :class:`Checkpoint` too."""
    warnings.warn("shardkit.run_convert is deprecated: call shardkit.convert, which takes a Checkpoint", DeprecationWarning, 2)
    return convert(checkpoint, dst, **options)


def _transform(checkpoint: Checkpoint, dtype: str | None, transforms: Transforms | None, config: dict | None, given: dict):
    """The transformed table (its ``dtypes`` are the planner's casts) and notes on what was chosen for the user
    (a DCP training state dict's model group, when no option picks names)."""
    if transforms is None:
        transforms = Transforms.of(**given)
    elif any(given.values()):
        raise UsageError("pass transforms either as Transforms or as keyword arguments, not both", code="bad-option")
    if dtype is not None and dtype != "auto":
        _dtype(dtype)  # the plain-cast error message
    transforms = replace(transforms, dtype=dtype if dtype is not None else transforms.dtype)
    notes: list[str] = []
    if not transforms.changes_names:
        checkpoint, notes = _default_selection(checkpoint)
    if config is None:
        config = read_config(checkpoint)
    return transform(checkpoint, transforms, config), notes


def write(
    checkpoint: Checkpoint,
    plan: Plan,
    dst,
    *,
    overwrite: bool = False,
    verify: bool = False,
    dry_run: bool = False,
    progress: bool = False,
    weights_only: bool = False,
    transformed: Transformed | None = None,
    notes: list[str] | None = None,
) -> WriteSummary:
    """Carry out ``plan`` into the folder ``dst``, atomically.

    Files are written into a temporary folder beside ``dst`` and fsynced; with ``verify`` every tensor is read back
    and compared with its source; then the folder is published (index last). On any error nothing is left at
    ``dst`` and :class:`~shardkit.errors.ShardkitError` is raised (``OutputError`` for write failures).
    ``dry_run`` checks the destination and returns the plan's summary without writing. Unless ``weights_only``,
    the model's other files in the source's folder (:mod:`shardkit.write.other_files`) are put beside the output.
    """
    if not plan.files:
        raise UsageError(f"{checkpoint.source}: holds no tensors; nothing to write")
    dst = os.path.abspath(os.fspath(dst))
    if checkpoint.root != "":  # "": a Hub repo read by ranges (a dry run), nothing local to protect
        refuse_inside(dst, checkpoint.source, [info.path for info in checkpoint.files])
    summary = _summary(checkpoint, plan, dst)
    summary.notes = list(notes or [])
    others_from = None if weights_only or checkpoint.root == "" else source_folder(checkpoint.source)
    if others_from is not None:
        summary.other_files = find_other_files(others_from)
    if transformed is not None and transformed.listed:
        summary.mapping = transformed.mapping()
        summary.warnings = list(transformed.warnings)
    if dry_run:
        check_destination(Path(dst), overwrite)
        summary.dry_run = True
        return summary

    from .files import Sources, write_plan
    from .verify import verify_plan

    started = time.perf_counter()
    if progress and summary.materialized:
        _import_torch_visibly()
    bar = byte_bar(plan.total_size, enabled=progress, desc="writing")
    try:
        with Staging(dst, overwrite=overwrite) as staging, Sources() as sources:
            folder = str(staging.folder)
            written = write_plan(plan, folder, sources, bar.update if bar else lambda n: None, after_file=_stall_hook())
            if summary.other_files and others_from is not None:
                copy_other_files(others_from, folder, summary.other_files)
            if transformed is not None and transformed.config is not None:
                _write_config(folder, transformed.config)
            if verify:  # the second pass gets a bar of its own
                if bar is not None:
                    bar.close()
                bar = byte_bar(plan.total_size, enabled=progress, desc="verifying")
                verify_plan(plan, folder, sources, bar.update if bar else lambda n: None)
            staging.commit()
    except OSError as exc:
        reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else exc.strerror or str(exc)
        raise OutputError(f"{dst}: cannot write the output ({reason}); nothing was written", code="write-failed") from None
    finally:
        if bar is not None:
            bar.close()
    summary.files = [{"name": w.name, "size": w.size, "tensors": w.tensors} for w in written if w.name != plan.index_name]
    summary.verified = verify
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


def _write_config(folder: str, config: dict) -> None:
    """The config.json a transform changed (new dtype, no quantization_config), written like transformers does."""
    import json

    data = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")
    path = os.path.join(folder, "config.json")
    if os.path.lexists(path):
        os.unlink(path)  # the copied config.json may be a hard link to the source's: never write through it
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        write_all(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _summary(checkpoint: Checkpoint, plan: Plan, dst: str) -> WriteSummary:
    from .files import planned_size

    metadata = plan.file_metadata() if plan.format == "safetensors" else None
    # the sizes of the files to be written (headers and zip records included), as the real run reports them
    files = [{"name": f.name, "size": planned_size(f, plan.format, metadata), "tensors": len(f.tensors)} for f in plan.files]
    return WriteSummary(
        source=checkpoint.source,
        destination=dst,
        format=plan.format,
        files=files,
        index=plan.index_name,
        tensors=sum(len(f.tensors) for f in plan.files),
        names=len(plan.weight_map),
        total_size=plan.total_size,
        dropped=dict(plan.dropped),
        materialized=sum(t.materialize for f in plan.files for t in f.tensors),
    )


def _default_selection(checkpoint: Checkpoint) -> tuple[Checkpoint, list[str]]:
    """A DCP training state dict with a ``model`` group: only the model weights, named as inside the group."""
    from ..formats.dcp import model_weights

    checkpoint, note = model_weights(checkpoint)
    return checkpoint, [note] if note else []


def _dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    try:
        parsed = parse_dtype(dtype)
    except UsageError:
        parsed = None
    if parsed not in ("BF16", "F16", "F32", "F64"):
        raise UsageError(f"--dtype {dtype!r}: use one of {CAST_CHOICES_TEXT}", code="bad-option")
    return parsed


def _import_torch_visibly() -> None:
    """Say so on the terminal while torch imports (seconds), before the bars of a run that casts or materializes."""
    from ..progress import status

    clear = status("shardkit: importing torch for the tensors that must be materialized...")
    try:
        import torch  # noqa: F401
    except ModuleNotFoundError:
        pass  # the write itself says what to install
    finally:
        clear()


def _stall_hook():
    seconds = os.environ.get(_STALL_ENV)
    if not seconds:
        return None

    def stall(path: str) -> None:
        sys.stderr.write(f"shardkit: wrote {path}\n")
        sys.stderr.flush()
        time.sleep(float(seconds))

    return stall
