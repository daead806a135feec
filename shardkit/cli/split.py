"""``shardkit split SRC DST``: reshard a checkpoint into Hub-style shards by copying byte ranges."""

from __future__ import annotations

import click

from ..units import format_size
from ..write import DEFAULT_MAX_SHARD_SIZE, WriteSummary
from . import emit_json, hub_options


def write_options(command):
    """Options shared by ``split`` and ``convert``."""
    options = [
        click.option(
            "--format",
            "fmt",
            type=click.Choice(["safetensors", "bin"]),
            default="safetensors",
            show_default=True,
            help="Output format: .safetensors files or torch .bin zips.",
        ),
        click.option("--dtype", help="Cast floating tensors to bf16, fp16 or fp32 (goes through torch one tensor at a time)."),
        click.option("--variant", help="Pick model.<VARIANT>.safetensors and friends in a SRC folder or repo."),
        click.option(
            "--overwrite", is_flag=True, help="Replace the checkpoint in a non-empty DST (its stale shards are removed)."
        ),
        click.option("--verify", is_flag=True, help="Read every written tensor back and compare it with its source."),
        click.option("--dry-run", is_flag=True, help="Print the plan (files, sizes, tensor counts) and write nothing."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        command = option(command)
    return hub_options(command)


@click.command("split")
@click.argument("src")
@click.argument("dst")
@click.option(
    "--max-shard-size",
    default=DEFAULT_MAX_SHARD_SIZE,
    show_default=True,
    help="Largest shard: 5GB, 5GiB, 500MB or a number of bytes. A larger tensor gets a shard of its own.",
)
@write_options
def split_command(
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
    quiet,
) -> None:
    """Reshard the checkpoint at SRC into the folder DST, packed like huggingface_hub in key order.

    SRC is a .safetensors/.bin file, an *.index.json, a folder, or a Hub repo id (org/name: only its checkpoint
    files are downloaded, into the Hugging Face cache). Contiguous tensors are copied as byte ranges (torch is
    never imported unless --dtype or a non-contiguous/legacy source needs it). DST appears atomically.
    """
    from ..write import split

    src = local_source(
        src, revision=revision, subfolder=subfolder, variant=variant, repo_type=repo_type, token=token, quiet=quiet
    )
    summary = split(
        src,
        dst,
        max_shard_size=max_shard_size,
        format=fmt,
        dtype=dtype,
        overwrite=overwrite,
        verify=verify,
        dry_run=dry_run,
        progress=not quiet and not as_json,
        variant=variant,
    )
    report(summary, as_json)


def local_source(src: str, *, revision, subfolder, variant, repo_type, token, quiet: bool) -> str:
    """``src`` itself when it exists locally; a Hub repo id's checkpoint files downloaded into the cache otherwise."""
    import os

    from ..hub.remote import looks_like_repo_id

    if os.path.exists(src) or not looks_like_repo_id(src):
        return os.path.join(src, subfolder) if subfolder else src
    from ..hub import download_checkpoint

    if quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    return str(
        download_checkpoint(src, revision=revision, subfolder=subfolder, variant=variant, repo_type=repo_type, token=token)
    )


def report(summary: WriteSummary, as_json: bool) -> None:
    """Print a summary: JSON, or a short human form."""
    if as_json:
        emit_json(summary.to_dict())
        return
    verb = "would write" if summary.dry_run else "wrote"
    click.echo(
        f"{verb} {summary.destination} ({summary.format}, {len(summary.files)} file(s), "
        f"{summary.tensors} tensors, {format_size(summary.total_size)})"
    )
    width = max(len(f["name"]) for f in summary.files)
    for info in summary.files:
        click.echo(f"  {info['name']:<{width}}  {format_size(info['size']):>10}  {info['tensors']:>6} tensors")
    if summary.index:
        click.echo(f"  {summary.index}")
    if summary.dropped:
        click.echo(
            f"  {len(summary.dropped)} shared name(s) recorded in metadata: "
            + ", ".join(f"{a} -> {k}" for a, k in list(summary.dropped.items())[:3])
        )
    if summary.materialized:
        click.echo(f"  {summary.materialized} tensor(s) materialized (cast, view or legacy file)")
    if summary.verified:
        click.echo("  verified: every tensor read back equals its source")
