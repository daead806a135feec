"""``--model-config``: does the checkpoint fit the model its config describes?

The model is built with transformers on the meta device (no memory, no weights), then its state dict's names
and shapes are compared with the checkpoint's table. Tied parameters (the same Parameter under several names)
are satisfied by any one of their names; non-persistent buffers are never expected and, when an old checkpoint
still holds them (``embeddings.position_ids``), never unexpected. A checkpoint saved from the base model and a
model with a head (or the reverse) are matched through the model's ``base_model_prefix``, as transformers does.
"""

from __future__ import annotations

from ..table import Checkpoint
from .checks import MAX_LISTED
from .report import Report


def build_meta_model(config_path: str):
    """The transformers model ``config_path`` describes, with empty weights. Imports torch and transformers."""
    from ..bigmodel.empty import empty_model_from_config

    return empty_model_from_config(config_path)


def check_model(checkpoint: Checkpoint, config_path: str | None, report: Report) -> None:
    """Record missing, unexpected and mis-shaped tensors of ``checkpoint`` against the model of ``config_path``."""
    if config_path is None:
        report.add("model-not-checked", "no config.json beside the checkpoint; pass --model-config PATH.")
        return
    try:
        model = build_meta_model(config_path)
    except ImportError as exc:
        report.add("model-not-checked", f"transformers is needed to build the model ({exc}).", file=config_path)
        return
    except Exception as exc:  # unknown architecture, bad config: the checkpoint may still be fine
        report.add(
            "model-not-checked",
            f"the model cannot be built from this config ({type(exc).__name__}: {exc})"[:300] + ".",
            file=config_path,
        )
        return

    groups = _tied_groups(model)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    buffers = {name for name, _ in model.named_buffers()}
    non_persistent = buffers - set(expected)
    have = {name: entry.shape for name, entry in checkpoint.entries.items()}
    have = _align_prefix(have, set(expected), getattr(model, "base_model_prefix", ""))

    missing, missing_buffers, mismatched = [], [], []
    for name, shape in expected.items():
        present = [n for n in groups.get(name, (name,)) if n in have]
        if not present:
            (missing_buffers if name in buffers else missing).append(name)
        elif tuple(have[present[0]]) != shape:
            mismatched.append((name, tuple(have[present[0]]), shape))
    tied_names = {n for group in groups.values() for n in group}
    unexpected = [n for n in have if n not in expected and n not in tied_names and n not in non_persistent]

    _check_declared_ties(checkpoint, groups, report)
    for name in missing[:MAX_LISTED]:
        report.add(
            "model-missing-key",
            "the model has this parameter but the checkpoint does not: it would keep random weights.",
            tensor=name,
        )
    for name in missing_buffers[:MAX_LISTED]:
        report.add("model-missing-buffer", "the model has this persistent buffer but the checkpoint does not.", tensor=name)
    for name, got, want in mismatched[:MAX_LISTED]:
        report.add(
            "model-shape-mismatch", f"the checkpoint's shape {list(got)} differs from the model's {list(want)}.", tensor=name
        )
    for name in unexpected[:MAX_LISTED]:
        report.add(
            "model-unexpected-key", "the checkpoint holds this tensor but the model has no such parameter or buffer.", tensor=name
        )
    for code, items in (
        ("model-missing-key", missing),
        ("model-missing-buffer", missing_buffers),
        ("model-shape-mismatch", mismatched),
        ("model-unexpected-key", unexpected),
    ):
        if len(items) > MAX_LISTED:
            report.add(code, f"... and {len(items) - MAX_LISTED} more tensors with the same problem.")


def _check_declared_ties(checkpoint: Checkpoint, groups: dict[str, tuple[str, ...]], report: Report) -> None:
    """Names the model ties (shared parameters, ``all_tied_weights_keys``) stored as different tensors: an error,
    since loading keeps one of them and silently discards the other."""
    import os

    from ..write.tied import Descriptors, same_tensor

    seen: set[tuple[str, ...]] = set()
    reported = {f.tensor for f in report.findings if f.code == "tied-head-differs"}  # by the config.json check
    with Descriptors() as fds:
        for group in groups.values():
            if group in seen:
                continue
            seen.add(group)
            stored = [n for n in group if n in checkpoint and checkpoint[n].alias_of is None]
            if len(stored) < 2:
                continue
            first = checkpoint[stored[0]]
            for name in stored[1:]:
                other = checkpoint[name]
                if name in reported or not all(os.path.isfile(e.file) for e in (first, other)):
                    continue
                if not same_tensor(first, other, fds):
                    report.add(
                        "tied-head-differs",
                        f"the model ties this parameter to {first.name}, but the checkpoint holds other values for it: "
                        "loading keeps one and silently discards the other.",
                        tensor=name,
                    )


def _tied_groups(model) -> dict[str, tuple[str, ...]]:
    """``{name: all names of the same parameter}`` for parameters reachable under several names."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    groups = {}
    for names in by_id.values():
        if len(names) > 1:
            for name in names:
                groups[name] = tuple(names)
    # transformers >= 5 may declare ties it applies only when loading: {tied name: source name}.
    declared = getattr(model, "all_tied_weights_keys", None) or {}
    if isinstance(declared, dict):
        for target, origin in declared.items():
            if isinstance(target, str) and isinstance(origin, str):
                group = tuple(dict.fromkeys(groups.get(origin, (origin,)) + groups.get(target, (target,))))
                for name in group:
                    groups[name] = group
    return groups


def _align_prefix(have: dict, expected: set[str], prefix: str) -> dict:
    """Rename checkpoint keys so that a base-model checkpoint matches a head model, or the reverse."""
    if not prefix or not have:
        return have
    dotted = prefix + "."
    model_prefixed = any(n.startswith(dotted) for n in expected)
    ckpt_prefixed = any(n.startswith(dotted) for n in have)
    if model_prefixed and not ckpt_prefixed:
        return {dotted + n if dotted + n in expected else n: s for n, s in have.items()}
    if ckpt_prefixed and not model_prefixed:
        return {n[len(dotted) :] if n.startswith(dotted) else n: s for n, s in have.items()}
    return have
