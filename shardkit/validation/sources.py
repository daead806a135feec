"""Where validation reads a checkpoint from: :mod:`shardkit.sources` (kept here for the former import path)."""

from __future__ import annotations

from ..sources import LocalFolder, Source

__all__ = ["LocalFolder", "Source"]
