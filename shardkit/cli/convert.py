"""``shardkit convert SRC DST``: rewrite a checkpoint in another format, keeping its shard layout."""

from __future__ import annotations

import click

from .push import split_push_options
from .split import _quiet_library_warnings, finish, source_checkpoint, write_options


@click.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--max-shard-size", default=None, help="Repack into shards of this size instead of keeping the layout.")
@write_options
def convert_command(
    src,
    dst,
    max_shard_size,
    fmt,
    dtype,
    variant,
    revision,
    subfolder,
    repo_type,
    token,
    overwrite,
    verify,
    dry_run,
    as_json,
    weights_only,
    quiet,
    **transforms,
) -> None:
    """Convert the checkpoint at SRC (.bin, single or sharded) to safetensors in the folder DST.

    Each source file becomes one output file (pytorch_model-00001-of-00002.bin -> model-00001-of-00002.safetensors)
    and the new index lists the new files. Shared tensors keep one copy; the dropped names are recorded in the
    metadata the way huggingface_hub does. --format bin converts back. SRC may be a Hub repo id (org/name).
    """
    from ..write import convert

    _quiet_library_warnings()
    push = split_push_options(transforms)
    checkpoint = source_checkpoint(
        src,
        revision=revision,
        subfolder=subfolder,
        variant=variant,
        repo_type=repo_type,
        token=token,
        quiet=quiet,
        dry_run=dry_run,
        other_files=not weights_only,
    )
    summary = convert(
        checkpoint,
        dst,
        max_shard_size=max_shard_size,
        format=fmt,
        dtype=dtype,
        overwrite=overwrite,
        verify=verify,
        dry_run=dry_run,
        progress=not quiet and not as_json,
        weights_only=weights_only,
        **transforms,
    )
    finish(summary, as_json, token=token, quiet=quiet, **push)
