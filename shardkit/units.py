"""Byte sizes: parse what users type (``5GB``, ``5GiB``, ``500MB``, ``123``) and print sizes for people."""

from __future__ import annotations

import re

from .errors import UsageError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: decimal units (``KB``, ``MB``, ``GB``, ``TB``), binary ones (``KiB``…``TiB``), or a plain count.

    Units are case-insensitive. Bare ``K``/``M``/``G``/``T`` are refused as ambiguous rather than guessed.
    Raises :class:`UsageError` for anything else, zero and negative sizes included.
    """
    value: float
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = text, ""
    else:
        match = _SIZE_RE.match(str(text))
        if not match:
            raise UsageError(f"cannot read {text!r} as a size: write e.g. 5GB, 5GiB, 500MB or a number of bytes")
        value, unit = float(match[1]), match[2].lower()
        if unit in ("k", "m", "g", "t"):
            raise UsageError(
                f"size {text!r} is ambiguous: write {match[1]}{unit.upper()}B (powers of 10) or "
                f"{match[1]}{unit.upper()}iB (powers of 2)"
            )
        if unit not in _UNITS:
            raise UsageError(f"unknown unit {match[2]!r} in {text!r}: use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB")
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise UsageError(f"size {text!r} must be larger than zero")
    return size


def format_size(size: int) -> str:
    """``1.35 GB``-style text (decimal units, as the Hub shows sizes)."""
    for unit, factor in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= factor:
            return f"{size / factor:.2f} {unit}"
    return f"{size} B"


def plural(count: int, word: str, words: str | None = None) -> str:
    """``1 tensor``, ``2 tensors``, ``1,024 files`` (``words``: an irregular plural, e.g. ``aliases``)."""
    return f"{count:,} {word if count == 1 else (words or word + 's')}"


def tensor_count(tensors: int, aliases: int = 0) -> str:
    """``52 tensors (+1 alias)``: stored tensors, and the names that share their bytes (the same in every command)."""
    text = plural(tensors, "tensor")
    return f"{text} (+{plural(aliases, 'alias', 'aliases')})" if aliases else text
