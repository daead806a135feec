"""A planning tree from checkpoint tensor names alone (no model, no torch): what ``shardkit plan`` uses without a config.

Names are split on dots into modules. Children named by integers under one parent (``model.layers.0``,
``h.0``, ``encoder.layer.0``) are the model's repeated blocks and are never split, like transformers'
``_no_split_modules``. The order of execution is guessed: a module's tensors first, then its children in
natural order, with embeddings first and heads last.
"""

from __future__ import annotations

import re

from ..dtypes import DTYPE_BITS, FLOATING, nbytes_of
from ..table import Checkpoint
from .placement import Node

_FIRST = re.compile(r"(embed|wte|wpe|tok_|token|shared)", re.IGNORECASE)
_LAST = re.compile(r"(lm_head|head|classifier|pooler|score|output)", re.IGNORECASE)
REPEATED = "repeated block"


def _natural(text: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _rank(child: str) -> int:
    last = child.rsplit(".", 1)[-1]
    return 0 if _FIRST.search(last) else 2 if _LAST.search(last) else 1


def checkpoint_tree(checkpoint: Checkpoint, dtype: str | None = None) -> tuple[Node, dict[str, int], list[list[str]]]:
    """The tree, ``{prefix: bytes}`` (floating tensors sized in ``dtype`` when given) and tied groups (aliases)."""
    sizes: dict[str, int] = {}
    tree: dict = {}
    for entry in checkpoint:
        node = tree
        parts = entry.name.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = None  # a tensor
        if entry.alias_of is not None:
            continue
        size = entry.nbytes
        if dtype is not None and entry.dtype in FLOATING:
            size = nbytes_of(dtype, entry.shape) or entry.numel * DTYPE_BITS[dtype] // 8
        for depth in range(len(parts) + 1):
            key = ".".join(parts[:depth])
            sizes[key] = sizes.get(key, 0) + size

    def build(name: str, children: dict) -> Node:
        tensors = sorted((k for k, v in children.items() if v is None), key=_natural)
        modules = sorted((k for k, v in children.items() if v is not None), key=lambda k: (_rank(k), _natural(k)))
        dot = f"{name}." if name else ""
        numbered = sum(k.isdigit() for k in modules) >= 2
        kids = [Node(dot + k, None) for k in tensors]
        for k in modules:
            child = build(dot + k, children[k])
            if numbered and k.isdigit():
                child.cls = REPEATED
            kids.append(child)
        return Node(name, "module", kids)

    tied: dict[str, list[str]] = {}
    for alias, target in checkpoint.aliases.items():
        tied.setdefault(target, [target]).append(alias)
    return build("", tree), sizes, [sorted(group) for group in tied.values()]
