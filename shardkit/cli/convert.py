"""``shardkit convert SRC DST``: rewrite a checkpoint in another format, keeping its shard layout."""

from __future__ import annotations

import click

from .split import run_write, write_options


@click.command("convert")
@click.argument("src")
@click.argument("dst")
@click.option("--max-shard-size", default=None, help="Repack into shards of this size instead of keeping the layout.")
@write_options
def convert_command(src, dst, **options) -> None:
    """Convert the checkpoint at SRC (.bin, single or sharded) to safetensors in the folder DST.

    Each source file becomes one output file (pytorch_model-00001-of-00002.bin -> model-00001-of-00002.safetensors)
    and the new index lists the new files. Shared tensors keep one copy; the dropped names are recorded in the
    metadata the way huggingface_hub does. --format bin converts back. SRC may be a Hub repo id (org/name).
    """
    from ..write import convert

    run_write(convert, src, dst, **options)
