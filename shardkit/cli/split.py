"""``shardkit split SRC DST``: reshard a checkpoint into Hub-style shards by copying byte ranges."""

from __future__ import annotations

import click

from ..dtypes import CAST_CHOICES_TEXT
from ..units import format_size, plural, tensor_count
from ..write import DEFAULT_MAX_SHARD_SIZE, WriteSummary
from . import emit_json, hub_options
from .push import push_options, split_push_options


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
        click.option(
            "--dtype",
            help=f"Cast floating tensors to {CAST_CHOICES_TEXT} (through torch, one tensor at a time). The output "
            "config.json states the new dtype.",
        ),
        click.option(
            "--keep-dtype",
            multiple=True,
            metavar="PATTERN",
            help="With --dtype: leave tensors matching this glob (or re:REGEX) in their dtype, e.g. '*norm*'. Repeatable.",
        ),
        click.option(
            "--select",
            multiple=True,
            metavar="PATTERN",
            help="Write only tensors whose name matches this glob (or re:REGEX, searched). Repeatable.",
        ),
        click.option(
            "--drop", multiple=True, metavar="PATTERN", help="Leave out tensors matching this glob (or re:REGEX). Repeatable."
        ),
        click.option(
            "--strip-prefix",
            multiple=True,
            metavar="PREFIX",
            help="Remove this prefix from names that start with it ('_orig_mod.', 'module.'). Repeatable.",
        ),
        click.option(
            "--rename",
            multiple=True,
            metavar="REGEX=REPL",
            help="Rename tensors with re.sub(REGEX, REPL), rules applied in order (after --strip-prefix). Repeatable.",
        ),
        click.option(
            "--dequantize",
            type=click.Choice(["bf16", "fp16", "fp32"]),
            help="Dequantize FP8 weights (block scales weight_scale_inv, or weight_scale) to this dtype; drop the scales.",
        ),
        click.option(
            "--experts",
            type=click.Choice(["packed", "per-expert"]),
            help="MoE experts as transformers 5's packed 3-D tensors, or one tensor per expert (transformers 4).",
        ),
        click.option("--untie", is_flag=True, help="Write tied (shared) tensors as a real copy under every name."),
        click.option(
            "--tie", is_flag=True, help="Drop a head identical to the input embeddings where config.json says they are tied."
        ),
        click.option("--variant", help="Pick model.<VARIANT>.safetensors and friends in a SRC folder or repo."),
        click.option(
            "--overwrite", is_flag=True, help="Replace the checkpoint in a non-empty DST (its stale shards are removed)."
        ),
        click.option("--verify", is_flag=True, help="Read every written tensor back and compare it with its source."),
        click.option("--dry-run", is_flag=True, help="Print the plan (files, sizes, tensor counts) and write nothing."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
        click.option(
            "--weights-only",
            is_flag=True,
            help="Write only the checkpoint; by default the model's other files (config, tokenizer, README...) of a "
            "SRC folder or repo are put into DST too (hard links where possible).",
        ),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar."),
        click.option(
            "--push-to",
            metavar="REPO_ID",
            help="Then publish DST to this Hub model repo's main branch in one commit, as `shardkit push` does "
            "(--token is used for it too).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return hub_options(push_options(command))


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
def split_command(src, dst, **options) -> None:
    """Reshard the checkpoint at SRC into the folder DST, packed like huggingface_hub in key order.

    SRC is a .safetensors/.bin file, an *.index.json, a folder, or a Hub repo id (org/name: only its checkpoint
    files are downloaded, into the Hugging Face cache). Contiguous tensors are copied as byte ranges (torch is
    never imported unless --dtype or a non-contiguous/legacy source needs it). DST appears atomically.
    """
    from ..write import split

    run_write(split, src, dst, **options)


def run_write(
    write,
    src,
    dst,
    *,
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
    """The body ``split`` and ``convert`` share: open SRC (with the Hub options), run ``write``
    (:func:`shardkit.write.split` or :func:`~shardkit.write.convert`), print the summary, push if asked."""
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
    summary = write(
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


def finish(summary: WriteSummary, as_json: bool, *, token, quiet: bool, push_to: str | None, **push) -> None:
    """Report what was written, then push it when ``--push-to`` asks (one JSON document with both under --json)."""
    if not push_to or summary.dry_run:
        report(summary, as_json)
        return
    from ..hub.publish import push as publish

    if not as_json:
        report(summary, False)
    result = publish(summary.destination, push_to, token=token, progress=not quiet and not as_json, **push)
    from .push import render, warn_forced

    warn_forced(result)
    if as_json:
        emit_json({"write": summary.to_dict(), "push": result.to_dict()})
    else:
        click.echo(render(result))


def _quiet_library_warnings() -> None:
    """The CLI prints the transforms' warnings itself (one line each, from the summary)."""
    import warnings

    from ..write.transforms import TransformWarning

    warnings.simplefilter("ignore", TransformWarning)


def source_checkpoint(
    src: str, *, revision, subfolder, variant, repo_type, token, quiet: bool, dry_run: bool, other_files: bool = True
):
    """The table of SRC: a local path, or a Hub repo id's checkpoint (``dry_run``: from remote headers, nothing
    downloaded; otherwise its checkpoint files, and with ``other_files`` its config, tokenizer and other small
    files, downloaded into the Hugging Face cache, or found there offline)."""
    import os

    from ..reader import open_checkpoint
    from ..sources import is_hub_id, open_source, read_table

    if is_hub_id(src) and not dry_run:
        from ..hub import download_checkpoint

        if quiet:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        kwargs = dict(revision=revision, subfolder=subfolder, variant=variant, repo_type=repo_type, token=token)
        return open_checkpoint(download_checkpoint(src, **kwargs, with_config=True, other_files=other_files), variant=variant)
    # local files, or a dry run of a repo: its table from headers, nothing downloaded
    return read_table(open_source(src, revision=revision, subfolder=subfolder, repo_type=repo_type, token=token), variant)


def report(summary: WriteSummary, as_json: bool) -> None:
    """Print a summary: JSON, or a short human form."""
    for warning in summary.warnings:
        click.echo(f"shardkit: warning: {warning}", err=True)
    if as_json:
        emit_json(summary.to_dict())
        return
    if summary.dry_run and summary.mapping:
        for row in summary.mapping:
            sources = row["from"]
            old = sources[0] if len(sources) == 1 else f"{sources[0]} (+{len(sources) - 1} more)"
            how = "" if row["how"] == "copy" else f"  [{row['how']}]"
            click.echo(f"{old} -> {row['to']}{how}")
    verb = "would write" if summary.dry_run else "wrote"
    click.echo(
        f"{verb} {summary.destination} ({summary.format}, {plural(len(summary.files), 'file')}, "
        f"{tensor_count(summary.tensors, len(summary.dropped))}, {format_size(summary.total_size)} of tensor data)"
    )
    width = max(len(f["name"]) for f in summary.files)
    for info in summary.files:
        click.echo(f"  {info['name']:<{width}}  {format_size(info['size']):>10}  {_tensors(info['tensors'])}")
    if summary.index:
        click.echo(f"  {summary.index}")
    if summary.dropped:
        click.echo(
            f"  {plural(len(summary.dropped), 'shared name')} recorded in metadata: "
            + ", ".join(f"{a} -> {k}" for a, k in list(summary.dropped.items())[:3])
        )
    for note in summary.notes:
        click.echo(f"  note: {note}")
    if summary.other_files:
        shown = ", ".join(summary.other_files[:4]) + (", ..." if len(summary.other_files) > 4 else "")
        click.echo(f"  + {plural(len(summary.other_files), 'other file')} of the model: {shown}")
    if summary.materialized:
        click.echo(f"  {plural(summary.materialized, 'tensor')} materialized (cast, view or legacy file)")
    if summary.verified:
        click.echo("  verified: every tensor read back equals its source")


def _tensors(count: int) -> str:
    return f"{count:>6} {'tensor' if count == 1 else 'tensors'}"
