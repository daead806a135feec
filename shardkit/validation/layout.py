"""Layout checks: how files are named, sized and laid out, beyond whether each one parses."""

from __future__ import annotations

from ..dtypes import itemsize
from ..naming import INDEX_RE, index_file_name, parse_shard_name, single_file_name
from ..table import FileInfo, TensorEntry
from ..units import format_size
from .report import Report

#: The Hub refuses files over 50 GB and recommends staying under 20 GB (bigger files lose CDN caching).
HUB_FILE_LIMIT = 50 * 10**9
HUB_FILE_RECOMMENDED = 20 * 10**9


def check_file(name: str, info: FileInfo, entries: list[TensorEntry], report: Report) -> None:
    """Size against the Hub's limits and tensor offsets against their element size."""
    if info.size > HUB_FILE_LIMIT:
        report.add(
            "file-too-large",
            f"{format_size(info.size)} is over the Hub's 50 GB per-file limit: reshard with a smaller shard size.",
            file=name,
        )
    elif info.size > HUB_FILE_RECOMMENDED:
        report.add(
            "file-large", f"{format_size(info.size)} is over the Hub's 20 GB recommendation: consider resharding.", file=name
        )
    unaligned = [e for e in entries if e.offset is not None and e.nbytes and e.offset % itemsize(e.dtype)]
    if unaligned:
        first = unaligned[0]
        more = f" (and {len(unaligned) - 1} more tensors)" if len(unaligned) > 1 else ""
        report.add(
            "unaligned-tensor",
            f"starts at byte {first.offset}, not a multiple of its {itemsize(first.dtype)}-byte {first.dtype} elements{more}; "
            "rewrite the file with a writer that pads the header.",
            file=name,
            tensor=first.name,
        )


def check_numbering(index_name: str, files: list[str], report: Report) -> None:
    """Shard names ``<stem>-<i>-of-<n><suffix>`` must number 1..n once each, n being the number of files."""
    parsed = [(name, parse_shard_name(name.rsplit("/", 1)[-1])) for name in files]
    shards = [(name, p) for name, p in parsed if p is not None]
    if not shards:
        return
    totals = sorted({p[2] for _, p in shards})
    numbers = sorted(p[1] for _, p in shards)
    problems = []
    if len(totals) > 1:
        problems.append(f"shard names disagree on the count ({', '.join(map(str, totals))})")
    elif totals[0] != len(files):
        problems.append(f"shard names say {totals[0]} files but the index uses {len(files)}")
    duplicated = sorted({n for n in numbers if numbers.count(n) > 1})
    if duplicated:
        problems.append(f"shard number {duplicated[0]} is used twice")
    out_of_range = [n for n in numbers if not 1 <= n <= max(totals)]
    if out_of_range:
        problems.append(f"shard number {out_of_range[0]} is outside 1..{max(totals)}")
    if problems:
        report.add(
            "shard-numbering", "; ".join(problems) + ": a shard may be missing or left over from another layout.", file=index_name
        )


def check_folder(listing: dict[str, int], selected: str, used: set[str], report: Report, variant: str | None = None) -> None:
    """Files beside the checkpoint: stale shards of the same family, and a second copy in the other format."""
    families = set()
    index = INDEX_RE.match(selected)
    if index:  # model.safetensors.index.fp16.json -> shards model.fp16-*.safetensors
        stem, _, suffix = index["base"].rpartition(".")
        families.add((f"{stem}.{index['variant']}" if index["variant"] else stem, "." + suffix))
    for name in used | {selected}:
        shard = parse_shard_name(name)
        if shard is not None:
            families.add((shard[0], shard[3]))
        elif "." in name and not name.endswith(".json"):
            stem, _, suffix = name.rpartition(".")
            families.add((stem, "." + suffix))
    for name in sorted(listing):
        shard = parse_shard_name(name)
        if shard is not None and (shard[0], shard[3]) in families and name not in used:
            report.add(
                "stale-shard",
                "a shard that the checkpoint does not use, probably left from an earlier layout: delete it.",
                file=name,
            )

    safetensors = [n for n in (single_file_name("safetensors", variant), index_file_name("safetensors", variant)) if n in listing]
    torch_bin = [n for n in (single_file_name("bin", variant), index_file_name("bin", variant)) if n in listing]
    if safetensors and torch_bin:
        report.add(
            "mixed-formats",
            f"both {safetensors[0]} and {torch_bin[0]} are present; loaders use the safetensors one and ignore "
            "the other: delete one.",
            file=torch_bin[0],
        )
