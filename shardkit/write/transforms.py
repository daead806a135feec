"""Transforms while resharding: the output table as a pure function of the source table, the options and config.json.

:func:`transform` takes a checkpoint's table, a :class:`Transforms` and the ``config.json`` beside it, and returns
a :class:`Transformed`: a new table under the output names, whose entries are the source entries renamed (so
they stay byte-range copies), :class:`~shardkit.write.derived.PiecedEntry` objects (byte pieces of source
entries) or :class:`~shardkit.write.derived.ComputedEntry` objects (materialized by a recipe), plus each output
tensor's dtype. The planner and writer see only "ranges or computed tensor". Nothing here reads tensor data
(except ``--tie``, which compares two tensors' bytes) or imports torch.

The stages run in a fixed order, each seeing the names the previous one produced:

1. ``dequantize``: block-FP8 / scaled FP8 weights become computed entries; their scales go (source names).
2. ``select`` / ``drop``: glob patterns, or ``re:`` regular expressions (``re.search``), on the names so far.
3. ``strip_prefix``, then ``rename`` rules in order (``re.sub``).
4. ``experts``: MoE expert tensors packed into v5's 3-D tensors, or cut out of them.
5. ``untie`` / ``tie``: aliases written as real copies, or byte-identical head copies dropped.
6. ``dtype`` / ``keep_dtype``: the output dtype of each floating tensor.

Two source names landing on one output name is an error (before anything is written) naming both.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..dtypes import FLOATING, TORCH_NAMES, parse_dtype
from ..errors import UsageError
from ..table import Checkpoint, TensorEntry
from .moe import ExpertLayout, check_unique, relayout_experts

#: dtypes a cast may target (``--dtype``, ``--dequantize``).
CAST_TARGETS = ("BF16", "F16", "F32", "F64")

#: config.json ``dtype`` / ``torch_dtype`` value for each output dtype.
CONFIG_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


class TransformWarning(UserWarning):
    """A transform option that did nothing (a rename or prefix matching no name)."""


@dataclass(frozen=True, slots=True)
class Transforms:
    """The transform options of ``split`` and ``convert`` (see the module docstring for their order)."""

    select: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    rename: tuple[str, ...] = ()  # "REGEX=REPLACEMENT", applied in order
    strip_prefix: tuple[str, ...] = ()
    dtype: str | None = None  # bf16, fp16, fp32, fp64 or "auto" (from config.json)
    keep_dtype: tuple[str, ...] = ()
    dequantize: str | None = None  # bf16, fp16, fp32
    experts: ExpertLayout | None = None
    tie: bool = False
    untie: bool = False

    @classmethod
    def of(cls, **options) -> Transforms:
        """Build from keyword arguments, accepting a single string (or None) where a tuple is expected."""
        for key in ("select", "drop", "rename", "strip_prefix", "keep_dtype"):
            value = options.get(key)
            if value is None:
                options[key] = ()
            elif isinstance(value, str):
                options[key] = (value,)
            else:
                options[key] = tuple(value)
        return cls(**options)

    @property
    def changes_names(self) -> bool:
        return bool(self.select or self.drop or self.rename or self.strip_prefix or self.experts)


@dataclass(slots=True)
class Transformed:
    """The output table of a transform and what else the output needs."""

    checkpoint: Checkpoint
    #: output name -> output dtype, for tensors written in another dtype than their entry's
    dtypes: dict[str, str] = field(default_factory=dict)
    #: output name -> the source names it comes from (one for a renamed tensor, several for a packed one)
    origin: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: the config.json to write beside the output (None: copy it unchanged, if there is one)
    config: dict | None = None
    warnings: list[str] = field(default_factory=list)
    #: whether the old -> new mapping is worth listing (names, layouts or values change, not only dtypes)
    listed: bool = False

    def mapping(self) -> list[dict]:
        """``[{"from": [source names], "to": name, "how": ...}]`` in output order, for ``--dry-run``."""
        rows = []
        for name, entry in self.checkpoint.entries.items():
            from .derived import ComputedEntry, PiecedEntry

            if isinstance(entry, ComputedEntry):
                how = type(entry.recipe).__name__.lower()
            elif isinstance(entry, PiecedEntry):
                how = "pieces"
            elif entry.alias_of is not None:
                how = f"alias of {entry.alias_of}"
            else:
                how = "copy"
            if name in self.dtypes and self.dtypes[name] != entry.dtype:
                how += f", cast {entry.dtype} -> {self.dtypes[name]}"
            rows.append({"from": list(self.origin.get(name, (name,))), "to": name, "how": how})
        return rows


def read_config(checkpoint: Checkpoint) -> dict | None:
    """The ``config.json`` beside the checkpoint (its root folder), or None when there is none or it is unreadable."""
    if not checkpoint.root:
        return None
    path = os.path.join(checkpoint.root, "config.json")
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def transform(checkpoint: Checkpoint, options: Transforms, config: dict | None = None) -> Transformed:
    """The output table of ``checkpoint`` under ``options`` (``config``: the parsed config.json beside it).

    Raises :class:`UsageError` for bad options or inputs that cannot be transformed, before anything is written.
    Options that match nothing are reported in :attr:`Transformed.warnings` and as :class:`TransformWarning`.
    """
    matchers = _Matchers(options)  # every pattern is checked before any work
    origin: dict[str, tuple[str, ...]] = {e.name: (e.name,) for e in checkpoint}
    entries = dict(checkpoint.entries)
    new_config = None
    notes: list[str] = []

    if options.dequantize is not None:
        from .fp8 import dequantize_entries

        target = _cast_target(options.dequantize, "--dequantize")
        entries = dequantize_entries(checkpoint, entries, target, config, origin)
        new_config = dict(config) if config is not None else None
        if new_config is not None:
            new_config.pop("quantization_config", None)
            _set_config_dtype(new_config, target)

    entries = _select(entries, matchers)
    entries, origin = _rename(entries, origin, matchers, notes)

    if options.experts is not None:
        entries, origin = relayout_experts(entries, origin, options.experts, config, checkpoint.source)

    if options.untie and options.tie:
        raise UsageError("--tie and --untie cannot be combined", code="bad-option")
    if options.untie:
        entries = {name: replace(e, alias_of=None) if e.alias_of else e for name, e in entries.items()}
    if options.tie:
        from .tied import tie_head

        entries = tie_head(entries, config, checkpoint.source)

    dtypes, cast = _dtypes(entries, options, matchers, config, checkpoint.source)
    if cast is not None and config is not None:
        new_config = dict(new_config if new_config is not None else config)
        _set_config_dtype(new_config, cast)

    for note in notes:
        warnings.warn(note, TransformWarning, stacklevel=2)
    table = Checkpoint(
        source=checkpoint.source, format=checkpoint.format, entries=entries, files=checkpoint.files, root=checkpoint.root
    )
    return Transformed(
        checkpoint=table,
        dtypes=dtypes,
        origin={name: origin.get(name, (name,)) for name in entries},
        config=new_config,
        warnings=notes,
        listed=options.changes_names or options.dequantize is not None or options.tie or options.untie,
    )


# --- patterns and key mapping ---------------------------------------------------------------------------------


def compile_pattern(pattern: str, option: str) -> Callable[[str], bool]:
    """A predicate on names: a glob matched against the whole name, or ``re:REGEX`` searched in it."""
    if pattern.startswith("re:"):
        try:
            regex = re.compile(pattern[3:])
        except re.error as exc:
            raise UsageError(f"{option} {pattern!r}: not a valid regular expression ({exc})", code="bad-pattern") from None
        return lambda name: regex.search(name) is not None
    if not pattern:
        raise UsageError(f"{option}: empty pattern", code="bad-pattern")
    if pattern.count("[") != pattern.count("]"):
        raise UsageError(f"{option} {pattern!r}: unbalanced [ ] in a glob pattern", code="bad-pattern")
    regex = re.compile(fnmatch.translate(pattern))
    return lambda name: regex.match(name) is not None


def parse_rename(rule: str) -> tuple[re.Pattern, str]:
    """``REGEX=REPLACEMENT`` split at the first ``=`` that is not part of a regex construct (``(?=``, ``(?<=``,
    ``(?!=``… or an escaped ``\\=``); the replacement may use ``\\1`` / ``\\g<name>`` groups (a bad group
    reference is reported when a name first matches)."""
    split_at = None
    for position, char in enumerate(rule):
        if char == "=" and (position == 0 or rule[position - 1] not in "?<!\\"):
            split_at = position
            break
    if not split_at:
        raise UsageError(f"--rename {rule!r}: expected REGEX=REPLACEMENT", code="bad-pattern")
    pattern, replacement = rule[:split_at], rule[split_at + 1 :]
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--rename {rule!r}: not a valid regular expression ({exc})", code="bad-pattern") from None
    return regex, replacement


class _Matchers:
    def __init__(self, options: Transforms) -> None:
        self.select = [compile_pattern(p, "--select") for p in options.select]
        self.drop = [compile_pattern(p, "--drop") for p in options.drop]
        self.keep_dtype = [compile_pattern(p, "--keep-dtype") for p in options.keep_dtype]
        self.renames = [(rule, *parse_rename(rule)) for rule in options.rename]
        self.prefixes = list(options.strip_prefix)
        for prefix in self.prefixes:
            if not prefix:
                raise UsageError("--strip-prefix: empty prefix", code="bad-pattern")


def _select(entries: dict[str, TensorEntry], matchers: _Matchers) -> dict[str, TensorEntry]:
    if not matchers.select and not matchers.drop:
        return entries
    kept = {
        name: entry
        for name, entry in entries.items()
        if (not matchers.select or any(m(name) for m in matchers.select)) and not any(m(name) for m in matchers.drop)
    }
    if not kept:
        raise UsageError("--select/--drop leave no tensor to write", code="nothing-selected")
    # An alias whose kept tensor was dropped owns the (same) bytes now.
    return {
        name: replace(e, alias_of=None) if e.alias_of is not None and e.alias_of not in kept else e for name, e in kept.items()
    }


def map_name(name: str, matchers: _Matchers, hits: dict[str, int]) -> str:
    for prefix in matchers.prefixes:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            hits[prefix] = hits.get(prefix, 0) + 1
            break
    for rule, regex, replacement in matchers.renames:
        try:
            renamed, count = regex.subn(replacement, name)
        except (re.error, IndexError) as exc:
            raise UsageError(f"--rename {rule!r}: bad replacement ({exc})", code="bad-pattern") from None
        if count:
            hits[rule] = hits.get(rule, 0) + 1
            name = renamed
    return name


def _rename(
    entries: dict[str, TensorEntry], origin: dict[str, tuple[str, ...]], matchers: _Matchers, notes: list[str]
) -> tuple[dict[str, TensorEntry], dict[str, tuple[str, ...]]]:
    if not matchers.renames and not matchers.prefixes:
        return entries, origin
    hits: dict[str, int] = {}
    new_name = {name: map_name(name, matchers, hits) for name in entries}
    check_unique(new_name, "--rename/--strip-prefix")
    renamed, new_origin = {}, {}
    for name, entry in entries.items():
        target = new_name[name]
        alias = new_name.get(entry.alias_of) if entry.alias_of is not None else None
        renamed[target] = replace(entry, name=target, alias_of=alias) if (target != name or alias != entry.alias_of) else entry
        new_origin[target] = origin.get(name, (name,))
    for prefix in matchers.prefixes:
        if prefix not in hits:
            notes.append(f"--strip-prefix {prefix!r} matched no tensor name")
    for rule, _, _ in matchers.renames:
        if rule not in hits:
            notes.append(f"--rename {rule!r} matched no tensor name")
    return renamed, new_origin


# --- dtypes ---------------------------------------------------------------------------------------------------


def _cast_target(value: str, option: str) -> str:
    parsed = parse_dtype(value)
    if parsed not in CAST_TARGETS:
        raise UsageError(f"{option} {value!r}: use one of bf16, fp16, fp32, fp64", code="bad-option")
    return parsed


def config_dtype(config: dict | None, source: str) -> str:
    """The dtype ``--dtype auto`` means: ``dtype`` (transformers 5) or ``torch_dtype`` of config.json."""
    if config is None:
        raise UsageError(f"--dtype auto: no config.json beside {source} to read the dtype from", code="no-config")
    value = config.get("dtype", config.get("torch_dtype"))
    if not isinstance(value, str):
        text_config = config.get("text_config")
        if isinstance(text_config, dict):
            value = text_config.get("dtype", text_config.get("torch_dtype"))
    if not isinstance(value, str) or value == "auto":
        raise UsageError(f"--dtype auto: the config.json beside {source} states no dtype", code="no-config")
    return _cast_target(value, "--dtype auto: config.json dtype")


def _dtypes(
    entries: dict[str, TensorEntry], options: Transforms, matchers: _Matchers, config: dict | None, source: str
) -> tuple[dict[str, str], str | None]:
    """``({name: output dtype}, cast target)`` for the tensors that change dtype."""
    if options.dtype is None:
        if options.keep_dtype:
            raise UsageError("--keep-dtype needs --dtype", code="bad-option")
        return {}, None
    target = config_dtype(config, source) if options.dtype == "auto" else _cast_target(options.dtype, "--dtype")
    quantized = _quantized_names(entries)
    out = {}
    for name, entry in entries.items():
        if entry.dtype not in FLOATING or entry.dtype not in TORCH_NAMES or entry.dtype == target or name in quantized:
            continue
        if any(m(name) for m in matchers.keep_dtype):
            continue
        out[name] = target
    return out, target


def _quantized_names(entries: dict[str, TensorEntry]) -> set[str]:
    """Quantized weights and their scales: a cast would destroy them (dequantize them instead)."""
    names: set[str] = set()
    for name in entries:
        for suffix in ("_scale_inv", "_scale"):
            if name.endswith(suffix) and name[: -len(suffix)] in entries:
                names.update((name, name[: -len(suffix)]))
    return names


def _set_config_dtype(config: dict, dtype: str) -> None:
    value = CONFIG_DTYPES[dtype]
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for key in keys:
        config[key] = value
