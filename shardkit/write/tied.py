"""Tied input embeddings and LM head: which tensors they are, whether their bytes agree, ``--tie``.

transformers ties the output head to the input embeddings when config.json says ``tie_word_embeddings`` (on
the text config for multimodal models). A checkpoint may hold the head as an alias of the embeddings (one
stored tensor), as a redundant identical copy, or as a real, different matrix; which of these is right depends
on the config. These helpers find the pair by the names transformers' models use and compare their bytes in
bounded chunks (no torch unless a tensor is not byte-addressable).
"""

from __future__ import annotations

import os
from dataclasses import replace

from ..errors import UsageError
from ..table import TensorEntry
from .byteio import same_bytes
from .derived import Reader, byte_ranges

#: Output heads tied to the input embeddings, by name suffix.
HEAD_SUFFIXES = ("lm_head.weight", "embed_out.weight")
#: Input embeddings, by name suffix.
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "tok_embeddings.weight")


def tie_word_embeddings(config: dict | None) -> bool | None:
    """config.json's ``tie_word_embeddings`` (its ``text_config``'s when the top level is silent), or None."""
    if not isinstance(config, dict):
        return None
    value = config.get("tie_word_embeddings")
    if value is None and isinstance(config.get("text_config"), dict):
        value = config["text_config"].get("tie_word_embeddings")
    return value if isinstance(value, bool) else None


def head_and_embedding(names) -> tuple[str | None, str | None]:
    """The LM head's and the input embedding's names among ``names`` (None where absent or ambiguous)."""
    names = list(names)
    heads = [n for n in names if n.endswith(HEAD_SUFFIXES) and (n in HEAD_SUFFIXES or n[-len(_suffix(n)) - 1] == ".")]
    embeddings = [n for n in names if n.endswith(EMBEDDING_SUFFIXES) and "vision" not in n and "audio" not in n]
    head = heads[0] if len(heads) == 1 else None
    if len(embeddings) > 1:  # several towers: the one beside the head, e.g. model.language_model.embed_tokens
        embeddings = [n for n in embeddings if "language_model" in n or "text" in n] or embeddings
    embedding = embeddings[0] if len(embeddings) == 1 else None
    return head, embedding


def _suffix(name: str) -> str:
    return next(s for s in HEAD_SUFFIXES if name.endswith(s))


def same_tensor(a: TensorEntry, b: TensorEntry, fd) -> bool:
    """Whether ``a`` and ``b`` hold the same dtype, shape and bytes (``fd`` maps a path to an open descriptor)."""
    if (a.dtype, a.shape, a.nbytes) != (b.dtype, b.shape, b.nbytes):
        return False
    left, right = byte_ranges(a), byte_ranges(b)
    if left is not None and right is not None and len(left) == 1 and len(right) == 1:
        (fa, oa, n), (fb, ob, _) = left[0], right[0]
        return (fa, oa) == (fb, ob) or same_bytes(fd(fa), oa, fd(fb), ob, n, fa, fb)
    import torch

    reader = Reader(fd)
    return torch.equal(reader.tensor(a).view(torch.uint8), reader.tensor(b).view(torch.uint8))


class Descriptors:
    """Read-only descriptors opened on demand and closed together."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def __call__(self, path: str) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        return self.fds[path]

    def __enter__(self) -> Descriptors:
        return self

    def __exit__(self, *exc) -> None:
        for fd in self.fds.values():
            os.close(fd)


def tie_head(entries: dict[str, TensorEntry], config: dict | None, source: str) -> dict[str, TensorEntry]:
    """``--tie``: the head becomes an alias of the input embeddings, if config.json says they are tied and the
    checkpoint's two tensors are byte-identical; a different head is an error."""
    if tie_word_embeddings(config) is not True:
        raise UsageError(
            f"--tie: the config.json beside {source} does not say tie_word_embeddings: true; nothing is tied",
            code="tie-not-configured",
        )
    head, embedding = head_and_embedding(entries)
    if head is None or embedding is None:
        return entries  # nothing to drop (the head is absent already)
    head_entry, embedding_entry = entries[head], entries[embedding]
    if head_entry.alias_of == embedding or embedding_entry.alias_of == head:
        return entries
    with Descriptors() as fds:
        identical = same_tensor(head_entry, embedding_entry, fds)
    if not identical:
        raise UsageError(
            f"--tie: {head} differs from {embedding} although config.json ties them; a loader would discard the head",
            code="tie-differs",
        )
    out = dict(entries)
    out[head] = replace(embedding_entry, name=head, alias_of=embedding)
    return out
