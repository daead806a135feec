"""``shardkit validate TARGET``: exit 0 when sound, 1 when errors were found, 2 when TARGET can't be read."""

from __future__ import annotations

import sys

import click

from ..units import format_size, plural, tensor_count
from . import emit_json, hub_options, stdout_closed


@click.command("validate")
@click.argument("target")
@hub_options
@click.option("--variant", help="Pick model.<VARIANT>.safetensors and friends.")
@click.option(
    "--deep", is_flag=True, help="Also read tensor data: NaN/Inf counts, all-zero tensors (downloads a Hub repo's checkpoint)."
)
@click.option(
    "--checksums", type=click.Path(dir_okay=False), help="Per-tensor SHA-256 manifest: compared if FILE exists, else written."
)
@click.option(
    "--model-config",
    is_flag=False,
    flag_value="auto",
    default=None,
    metavar="[PATH]",
    help="Build the model from this config.json on the meta device and compare names and shapes. Alone (after "
    "TARGET): the config.json beside the checkpoint.",
)
@click.option(
    "--against",
    metavar="REPO_ID[@REV]",
    help="Compare every local checkpoint file's size and SHA-256 with this Hub repo's (LFS object ids), without downloading.",
)
@click.option(
    "--verify-blobs",
    is_flag=True,
    help="Hugging Face cache snapshot: hash each file against its blob's name (its SHA-256), offline.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def validate_command(
    target, revision, subfolder, variant, repo_type, token, deep, checksums, model_config, against, verify_blobs, as_json, quiet
) -> None:
    """Check that TARGET is a sound checkpoint and report every problem found.

    TARGET is a .safetensors/.bin file, an *.index.json file, a folder holding a checkpoint, or a Hub repo id
    (org/name) when no such local path exists. Only headers are read (a Hub repo's shards through HTTP range
    requests) unless --deep or --checksums asks for tensor data.
    """
    from ..errors import ShardkitError
    from ..validation import validate

    try:
        report = validate(
            target,
            revision=revision,
            subfolder=subfolder,
            variant=variant,
            repo_type=repo_type,
            token=token,
            deep=deep,
            checksums=checksums,
            model_config=model_config,
            against=against,
            verify_blobs=verify_blobs,
            progress=not quiet and not as_json,
        )
    except ShardkitError as exc:
        if as_json:  # CI parses every outcome: a document on stdout, the one-line error on stderr, exit 2
            emit_json(unreadable(target, exc))
        raise
    try:
        if as_json:
            emit_json(report.to_dict())
        else:
            click.echo(render(report))
    except BrokenPipeError:
        stdout_closed()  # the verdict is still the exit code
    sys.exit(0 if report.ok else 1)


def unreadable(target: str, exc) -> dict:
    """The ``--json`` document of a TARGET that could not be read at all (the report's keys, and the error)."""
    return {
        "target": target,
        "checkpoint": None,
        "verdict": "unreadable",
        "errors": 1,
        "warnings": 0,
        "files_checked": 0,
        "tensors_checked": 0,
        "aliases_checked": 0,
        "error": {"code": exc.code, "message": str(exc)},
        "findings": [],
    }


def render(report) -> str:
    """Findings grouped by severity, then a one-line verdict."""
    lines = []
    for title, findings in (("errors", report.errors), ("warnings", report.warnings)):
        if not findings:
            continue
        lines.append(f"{title} ({len(findings)})")
        for f in findings:
            where = " ".join(part for part in (f.file, f"[{f.tensor}]" if f.tensor else None) if part)
            lines.append(f"  {f.code:<22} {where + ': ' if where else ''}{f.message}")
        lines.append("")
    if report.files_checked:
        scope = f"{plural(report.files_checked, 'file')} read, {tensor_count(report.tensors_checked, report.aliases_checked)}"
    else:
        scope = "no checkpoint file could be read"
    if report.bytes_downloaded:
        scope += f", {format_size(report.bytes_downloaded)} downloaded"
    if report.server_ignored_range:
        scope += " (the server ignored Range: whole files, each streamed at most once)"
    if report.from_cache:
        scope += f", read from the local cache {report.from_cache} (HF_HUB_OFFLINE, or the Hub unreachable)"
    if report.checksums_written:
        scope += f", checksums written to {report.checksums_written}"
    if report.checksums_matched is not None:
        scope += f", {plural(report.checksums_matched, 'tensor')} match the checksum manifest"
    counts = f"{plural(len(report.errors), 'error')}, {plural(len(report.warnings), 'warning')}"
    verdict = {"sound": "SOUND", "sound-with-warnings": "SOUND (with warnings)", "broken": "BROKEN"}[report.verdict]
    lines.append(f"{verdict}: {report.target} ({report.checkpoint}): {counts}; {scope}")
    return "\n".join(lines)
