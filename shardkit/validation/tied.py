"""Tied weights against the config: does the checkpoint's LM head agree with ``tie_word_embeddings``?

- tied, and the head is a real tensor holding other bytes than the embeddings: an error (loaders that tie
  discard the head silently and the model generates gibberish);
- tied, and the head is a byte-identical copy: a warning (``shardkit split --tie`` drops it);
- not tied, and the checkpoint of a causal LM has no head at all: an error (the head would keep random weights).
"""

from __future__ import annotations

from ..table import Checkpoint
from ..write.tied import Descriptors, head_and_embedding, same_tensor, tie_word_embeddings
from .report import Report

#: Architectures with an LM head that is its own parameter unless tied.
_HEADED = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def check_tied(
    checkpoint: Checkpoint, config: dict | None, report: Report, *, read_bytes: bool = True, head_expected: bool = True
) -> None:
    """Record tied-weight findings of ``checkpoint`` against ``config`` (skipped when the config is silent).

    ``read_bytes`` compares a copied head's bytes with the embeddings'; ``head_expected`` reports a missing
    untied head (left to the model check when the model is built)."""
    tied = tie_word_embeddings(config)
    if tied is None:
        return
    head, embedding = head_and_embedding(checkpoint.entries)
    if tied:
        if head is None or embedding is None:
            return
        head_entry, embedding_entry = checkpoint[head], checkpoint[embedding]
        if head_entry.alias_of == embedding or embedding_entry.alias_of == head:
            return
        if (head_entry.dtype, head_entry.shape) != (embedding_entry.dtype, embedding_entry.shape):
            identical = False
        elif not read_bytes:
            return
        else:
            with Descriptors() as fds:
                identical = same_tensor(head_entry, embedding_entry, fds)
        if identical:
            report.add(
                "tied-head-redundant",
                f"config.json ties the head to {embedding}, and this is a redundant identical copy "
                "(`shardkit split --tie` drops it).",
                tensor=head,
            )
        else:
            report.add(
                "tied-head-differs",
                f"config.json says tie_word_embeddings, but this head holds other values than {embedding}: "
                "loaders that tie will silently discard it.",
                tensor=head,
            )
        return
    architectures = config.get("architectures") or []
    if head_expected and head is None and embedding is not None and any(str(a).endswith(_HEADED) for a in architectures):
        report.add(
            "untied-head-missing",
            f"config.json says tie_word_embeddings: false, but the checkpoint has no LM head beside {embedding}: "
            "the head would keep random weights.",
            tensor=embedding,
        )
