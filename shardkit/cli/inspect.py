"""``shardkit inspect PATH``."""

from __future__ import annotations

import os

import click

from ..inspect import split_dims, summarize
from ..sources import open_source, read_table
from ..units import format_size, tensor_count
from . import emit_json, hub_options


@click.command("inspect")
@click.argument("path")
@click.option("--variant", help="Pick model.<VARIANT>.safetensors and friends in a folder.")
@hub_options
@click.option("--tensors", "list_tensors", is_flag=True, help="Also list every tensor with dtype, shape and file.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect_command(
    path: str,
    variant: str | None,
    revision: str | None,
    subfolder: str | None,
    repo_type: str,
    token: str | None,
    list_tensors: bool,
    as_json: bool,
) -> None:
    """Show what the checkpoint at PATH holds, from its headers alone.

    PATH is a .safetensors/.bin/.pt file, an *.index.json file, a folder holding one, or a Hub repo id
    (org/name) when no such local path exists; a repo's shard headers are read with HTTP range requests.
    """
    source = open_source(path, revision=revision, subfolder=subfolder, repo_type=repo_type, token=token)
    checkpoint = read_table(source, variant)
    summary = summarize(checkpoint)
    if list_tensors:
        summary["tensor_list"] = [
            {
                "name": e.name,
                "dtype": e.dtype,
                "shape": list(e.shape),
                "bytes": e.nbytes,
                "file": os.path.relpath(e.file, checkpoint.root) if checkpoint.root and os.path.isabs(e.file) else e.file,
                "alias_of": e.alias_of,
            }
            | ({"chunks": len(e.chunks), "split_dims": list(split_dims(e))} if e.chunks else {})
            for e in checkpoint
        ]
    if as_json:
        emit_json(summary)
    else:
        click.echo(render(summary))


def render(summary: dict) -> str:
    """The human form of :func:`shardkit.inspect.summarize`'s result: aligned, one fact per line."""
    lines = []
    largest = summary["largest"]
    rows = [
        ("source", summary["source"]),
        ("format", summary["format"] + (" (sharded, " + summary["index"] + ")" if summary["sharded"] else "")),
        ("tensors", tensor_count(summary["tensors"], len(summary["aliases"]))),
        ("parameters", f"{summary['params']:,}"),
        ("size", f"{format_size(summary['bytes'])} ({summary['bytes']:,} bytes)"),
        (
            "largest",
            f"{largest['name']}  {largest['dtype']} {largest['shape']}  {format_size(largest['bytes'])}" if largest else "-",
        ),
        ("aliases", str(len(summary["aliases"]))),
    ]
    width = max(len(k) for k, _ in rows)
    lines += [f"{key:<{width}}  {value}" for key, value in rows]

    lines.append("")
    lines.append("dtypes")
    for dtype, row in summary["dtypes"].items():
        lines.append(f"  {dtype:<8} {_tensors(row['tensors'])}  {format_size(row['bytes']):>10}  {row['share']:>6.1%}")

    lines.append("")
    lines.append(f"files ({len(summary['files'])})")
    name_width = max((len(f["path"]) for f in summary["files"]), default=0)
    for info in summary["files"]:
        lines.append(
            f"  {info['path']:<{name_width}}  {format_size(info['size']):>10}  {_tensors(info['tensors'])}  {info['format']}"
        )

    if "groups" in summary:
        lines.append("")
        lines.append("groups")
        for group, row in summary["groups"].items():
            items = f"  {row['items']:>4,} other items" if row["items"] else ""
            lines.append(f"  {group:<16} {row['tensors']:>7,} tensors  {format_size(row['bytes']):>10}{items}")
        lines.append("")
        sharding = summary["sharding"]
        lines.append(f"sharding ({sharding['byte_range_copies']:,} tensors are plain byte-range copies)")
        for layout, row in sharding["layouts"].items():
            chunks = row["chunks_min"] if row["chunks_min"] == row["chunks_max"] else f"{row['chunks_min']}-{row['chunks_max']}"
            lines.append(f"  {layout:<10} {row['tensors']:>7,} tensors  {format_size(row['bytes']):>10}  {chunks} chunk(s) each")
    if summary["aliases"]:
        lines.append("")
        lines.append("aliases (share bytes with)")
        for alias, target in summary["aliases"].items():
            lines.append(f"  {alias} -> {target}")
    if summary["skipped"]:
        lines.append("")
        lines.append("non-tensor entries (ignored)")
        for name, what in summary["skipped"].items():
            lines.append(f"  {name}: {what}")
    if "tensor_list" in summary:
        lines.append("")
        lines.append("tensors")
        lines += _table(
            ["name", "dtype", "shape", "size", "file"],
            [
                [
                    row["name"],
                    row["dtype"],
                    "[" + ", ".join(map(str, row["shape"])) + "]",
                    format_size(row["bytes"]),
                    f"= {row['alias_of']}" if row["alias_of"] else row["file"],
                ]
                for row in summary["tensor_list"]
            ],
            right={3},
        )
    return "\n".join(lines)


def _tensors(count: int) -> str:
    """A right-aligned count column that still says ``1 tensor``."""
    return f"{count:>7,} {'tensor ' if count == 1 else 'tensors'}"


def _table(header: list[str], rows: list[list[str]], *, right: set[int] = frozenset()) -> list[str]:
    """Rows in aligned columns under ``header`` (columns in ``right`` right-aligned), indented by two spaces."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        parts = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(cells, widths))]
        return ("  " + "  ".join(parts)).rstrip()

    return [line(header)] + [line(row) for row in rows]
