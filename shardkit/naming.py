"""The Hub's file-naming conventions, in one place.

``model.safetensors`` / ``pytorch_model.bin`` for one file; ``model-00001-of-00004.safetensors`` for shards
(1-based, five digits); ``model.safetensors.index.json`` / ``pytorch_model.bin.index.json`` for the index. A
variant goes before the last dot: ``model.fp16.safetensors``, ``model.fp16-00001-of-00002.safetensors``,
``model.safetensors.index.fp16.json``.
"""

from __future__ import annotations

import os
import re
from typing import Literal

from .errors import CheckpointError

#: The formats shardkit writes: ``.safetensors`` files or torch zip ``.bin`` files.
OutputFormat = Literal["safetensors", "bin"]

#: Output format -> (file stem, suffix).
FORMATS: dict[OutputFormat, tuple[str, str]] = {"safetensors": ("model", ".safetensors"), "bin": ("pytorch_model", ".bin")}

#: Suffixes of the checkpoint files a folder or repo is searched for (readers, validation, the Hub side).
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: Suffixes of torch pickles (zip or legacy): a file with one is never sniffed as safetensors. ``.ckpt`` is read
#: when named but not searched for: Lightning's ``.ckpt`` holds a whole training state, not a state dict.
TORCH_SUFFIXES = (*CHECKPOINT_SUFFIXES[1:], ".ckpt")

SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<total>\d{5})(?P<suffix>\.[A-Za-z0-9]+)$")
INDEX_RE = re.compile(r"^(?P<base>.+\.(?:safetensors|bin))\.index(?:\.(?P<variant>[^.]+))?\.json$")


def _stem(fmt: OutputFormat, variant: str | None) -> tuple[str, str]:
    stem, suffix = FORMATS[fmt]
    return (f"{stem}.{variant}" if variant else stem), suffix


def single_file_name(fmt: OutputFormat = "safetensors", variant: str | None = None) -> str:
    """``model.safetensors``, ``pytorch_model.bin``, ``model.fp16.safetensors``…"""
    stem, suffix = _stem(fmt, variant)
    return stem + suffix


def shard_file_name(index: int, total: int, fmt: OutputFormat = "safetensors", variant: str | None = None) -> str:
    """``model-00002-of-00004.safetensors`` for ``index=2, total=4`` (1-based)."""
    stem, suffix = _stem(fmt, variant)
    return f"{stem}-{index:05d}-of-{total:05d}{suffix}"


def index_file_name(fmt: OutputFormat = "safetensors", variant: str | None = None) -> str:
    """``model.safetensors.index.json``, ``pytorch_model.bin.index.fp16.json``…"""
    stem, suffix = FORMATS[fmt]
    return f"{stem}{suffix}.index.{variant}.json" if variant else f"{stem}{suffix}.index.json"


def parse_shard_name(name: str) -> tuple[str, int, int, str] | None:
    """``(stem, index, total, suffix)`` of a shard file name, or None if it isn't one."""
    match = SHARD_RE.match(name)
    if match is None:
        return None
    return match["stem"], int(match["index"]), int(match["total"]), match["suffix"]


def format_of_name(name: str) -> str | None:
    """``safetensors`` or ``bin`` as a file name (shard, single file or index) suggests, else None."""
    if name.endswith(".json"):
        match = INDEX_RE.match(name)
        name = match["base"] if match else name
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(TORCH_SUFFIXES):
        return "bin"
    return None


def is_layout_name(name: str) -> bool:
    """Whether ``name`` is a file of a layout shardkit writes: a single file, shard or index named with a stem
    and a suffix of :data:`FORMATS` (any pairing: ``pytorch_model.safetensors`` too), without a variant."""
    base = name.removesuffix(".index.json")
    shard = parse_shard_name(base)
    stem, suffix = (shard[0], shard[3]) if shard else os.path.splitext(base)
    return stem in {s for s, _ in FORMATS.values()} and suffix in {x for _, x in FORMATS.values()}


def pick_checkpoint(names: list[str], variant: str | None = None) -> str | None:
    """The checkpoint file or index among a folder's file ``names``, in transformers' order of preference.

    ``model.safetensors``, then its index, then ``pytorch_model.bin``, then its index (``variant`` applied);
    else the only index (any ``*.index.json`` when none has a checkpoint's name), else the only checkpoint
    file. Returns None when there is none and raises
    ``ValueError`` listing the candidates when there are several.
    """
    present = set(names)
    for name in (
        single_file_name("safetensors", variant),
        index_file_name("safetensors", variant),
        single_file_name("bin", variant),
        index_file_name("bin", variant),
    ):
        if name in present:
            return name
    ordered = sorted(present)
    indexes = [n for n in ordered if (m := INDEX_RE.match(n)) and (variant is None or m["variant"] == variant)]
    if not indexes and variant is None:  # accelerate's rule: a folder's only ``*.index.json``, whatever its name
        indexes = [n for n in ordered if n.endswith(".index.json")]
    singles = [n for n in ordered if n.endswith(CHECKPOINT_SUFFIXES) and (variant is None or f".{variant}." in n)]
    for group in (indexes, singles):
        if len(group) == 1:
            return group[0]
        if len(group) > 1:
            raise ValueError(", ".join(group[:4]) + (", ..." if len(group) > 4 else ""))
    return None


def select_checkpoint(names: list[str], label: str, variant: str | None = None, *, hint: str = "") -> str:
    """:func:`pick_checkpoint` or raise: ``ambiguous`` when ``names`` hold several checkpoints, ``no-checkpoint``
    when none. ``label`` names the folder or repo in the error; ``hint`` ends the ambiguous message (what to pass)."""
    try:
        selected = pick_checkpoint(names, variant)
    except ValueError as exc:
        raise CheckpointError(label, f"holds several checkpoints ({exc}){hint}", code="ambiguous") from None
    if selected is None:
        what = f" for variant {variant!r}" if variant else ""
        raise CheckpointError(label, f"holds no checkpoint{what} (no .safetensors, .bin or index file)", code="no-checkpoint")
    return selected


def looks_like_repo_id(text: str) -> bool:
    """``org/name`` with no path-like parts (a path that exists locally always wins over a repo id)."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not any(p in (".", "..") for p in parts)


def checkpoint_family(path: str) -> tuple[str, str, str] | None:
    """``(folder, stem with variant, suffix)`` of a checkpoint file or index path, or None for other files.

    ``model-00001-of-00002.safetensors``, ``model.safetensors`` and ``model.safetensors.index.json`` are all
    ``("", "model", ".safetensors")``; ``model.fp16-00001-of-00002.safetensors`` and
    ``model.safetensors.index.fp16.json`` are ``("", "model.fp16", ".safetensors")``.
    """
    folder, _, name = path.rpartition("/")
    index = INDEX_RE.match(name)
    if index:
        stem, _, suffix = index["base"].rpartition(".")
        return folder, f"{stem}.{index['variant']}" if index["variant"] else stem, "." + suffix
    shard = parse_shard_name(name)
    if shard is not None and shard[3] in CHECKPOINT_SUFFIXES:
        return folder, shard[0], shard[3]
    if name.endswith(CHECKPOINT_SUFFIXES) and "." in name:
        stem, _, suffix = name.rpartition(".")
        return folder, stem, "." + suffix
    return None
