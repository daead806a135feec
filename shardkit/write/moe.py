"""MoE expert layouts: transformers 4's one tensor per expert, or transformers 5's packed 3-D tensors.

transformers 5 packs the experts of Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3 and Mixtral into
``mlp.experts.gate_up_proj [E, 2I, H]`` (per expert: its gate rows, then its up rows) and
``mlp.experts.down_proj [E, H, I]``. Its loader converts per-expert checkpoints with ``MergeModulelist(dim=0)``
then ``Concatenate(dim=1)`` (``transformers/conversion_mapping.py``); :data:`FAMILIES` restates those mappings
for the byte path (which never imports transformers or torch), and ``tests/test_moe.py`` checks them against
transformers' own. Packing is concatenation along the expert dimension, so a packed tensor is a list of byte
pieces of the per-expert tensors, and each per-expert tensor one byte piece of a packed one: nothing is
materialized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

from ..dtypes import DTYPE_BITS
from ..errors import UsageError
from ..table import TensorEntry
from .derived import Piece, PiecedEntry

#: How MoE experts are stored: transformers 5's packed 3-D tensors, or one tensor per expert (transformers 4).
ExpertLayout = Literal["packed", "per-expert"]


def check_unique(new_name: dict[str, str], option: str) -> None:
    """Raise naming both sources when two old names map to one new name."""
    seen: dict[str, str] = {}
    for old, new in new_name.items():
        if new in seen:
            raise UsageError(
                f"{option} maps both {seen[new]!r} and {old!r} to {new!r}; nothing was written", code="key-collision"
            )
        seen[new] = old


@dataclass(frozen=True, slots=True)
class Family:
    """How one family of architectures names its experts, per expert and packed."""

    #: the experts' module in the per-expert layout, before ``.experts.``
    moe_module: str
    #: per-expert projection names: gate, up, down
    gate: str
    up: str
    down: str

    def per_expert_re(self) -> re.Pattern:
        projections = "|".join(map(re.escape, (self.gate, self.up, self.down)))
        return re.compile(
            rf"^(?P<prefix>(?:.*\.)?){re.escape(self.moe_module)}\.experts\.(?P<expert>\d+)\.(?P<proj>{projections})\.weight$"
        )


#: Packed tensors always live under ``mlp.experts`` (transformers 5's module names).
PACKED_RE = re.compile(r"^(?P<prefix>(?:.*\.)?)mlp\.experts\.(?P<proj>gate_up_proj|down_proj)$")

FAMILIES: dict[str, Family] = {
    "qwen2_moe": Family(moe_module="mlp", gate="gate_proj", up="up_proj", down="down_proj"),
    # Mixtral also renames its MoE module: block_sparse_moe -> mlp.
    "mixtral": Family(moe_module="block_sparse_moe", gate="w1", up="w3", down="w2"),
}

#: config.json ``model_type`` -> family, for the architectures whose transformers 5 mapping is exactly the family's.
MODEL_TYPES: dict[str, str] = {
    "qwen2_moe": "qwen2_moe",
    "qwen3_moe": "qwen2_moe",
    "olmoe": "qwen2_moe",
    "deepseek_v2": "qwen2_moe",
    "deepseek_v3": "qwen2_moe",
    "flex_olmo": "qwen2_moe",
    "mixtral": "mixtral",
}


def family_of(config: dict | None, source: str) -> tuple[str, Family]:
    """The family for the config's ``model_type``; raise naming the architecture when unknown."""
    if config is None:
        raise UsageError(
            f"--experts: no config.json beside {source} to tell the architecture; pass the folder holding it",
            code="no-config",
        )
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        architectures = config.get("architectures") or []
        named = f"{model_type!r}" + (f" ({', '.join(map(str, architectures))})" if architectures else "")
        raise UsageError(
            f"--experts: shardkit does not know how {named} packs its experts (known: {', '.join(sorted(MODEL_TYPES))})",
            code="experts-unknown-arch",
        )
    return model_type, FAMILIES[MODEL_TYPES[model_type]]


def relayout_experts(
    entries: dict[str, TensorEntry],
    origin: dict[str, tuple[str, ...]],
    layout: ExpertLayout,
    config: dict | None,
    source: str,
) -> tuple[dict[str, TensorEntry], dict[str, tuple[str, ...]]]:
    """``entries`` with every MoE layer's experts in ``layout`` (``"packed"`` or ``"per-expert"``)."""
    if layout not in ("packed", "per-expert"):
        raise UsageError(f"--experts {layout!r}: use packed or per-expert", code="bad-option")
    model_type, family = family_of(config, source)
    if layout == "packed":
        return _pack(entries, origin, family, model_type)
    return _unpack(entries, origin, family, model_type)


def _pack(entries, origin, family: Family, model_type: str):
    pattern = family.per_expert_re()
    layers: dict[str, dict[int, dict[str, TensorEntry]]] = {}
    for name, entry in entries.items():
        match = pattern.match(name)
        if match:
            experts = layers.setdefault(match["prefix"], {})
            experts.setdefault(int(match["expert"]), {})[match["proj"]] = entry
    if not layers:
        _nothing_to_do(entries, "per-expert", model_type)
        return entries, origin

    positions = {name: i for i, name in enumerate(entries)}
    packed: dict[str, list[PiecedEntry]] = {}  # first per-expert name -> packed entries replacing the layer
    for prefix, experts in layers.items():
        module = f"{prefix}{family.moe_module}.experts"
        count = max(experts) + 1
        for index in range(count):
            for proj in (family.gate, family.up, family.down):
                if proj not in experts.get(index, {}):
                    raise UsageError(
                        f"--experts packed: {module}.{index}.{proj}.weight is missing ({module} has experts up to "
                        f"{count - 1}); nothing was written",
                        code="experts-incomplete",
                    )
        gate0, down0 = experts[0][family.gate], experts[0][family.down]
        if len(gate0.shape) != 2 or DTYPE_BITS[gate0.dtype] % 8:
            raise UsageError(f"--experts packed: {gate0.name} is {gate0.dtype} {list(gate0.shape)}, not a 2-D matrix")
        inner, hidden = gate0.shape
        for index in range(count):
            for proj, shape in ((family.gate, (inner, hidden)), (family.up, (inner, hidden)), (family.down, (hidden, inner))):
                entry = experts[index][proj]
                if entry.shape != shape or entry.dtype != gate0.dtype:
                    raise UsageError(
                        f"--experts packed: {entry.name} is {entry.dtype} {list(entry.shape)} but {gate0.name} is "
                        f"{gate0.dtype} {list(gate0.shape)}: experts of one layer must match",
                        code="experts-mismatch",
                    )
        target = f"{prefix}mlp.experts"
        gate_up = [piece for i in range(count) for piece in (_whole(experts[i][family.gate]), _whole(experts[i][family.up]))]
        down = [_whole(experts[i][family.down]) for i in range(count)]
        first = min((e for i in range(count) for e in experts[i].values()), key=lambda e: positions[e.name])
        packed[first.name] = [
            _pieced(f"{target}.gate_up_proj", gate0, (count, 2 * inner, hidden), gate_up),
            _pieced(f"{target}.down_proj", down0, (count, hidden, inner), down),
        ]

    members = {e.name for experts in layers.values() for per in experts.values() for e in per.values()}
    out: dict[str, TensorEntry] = {}
    new_origin: dict[str, tuple[str, ...]] = {}
    for name, entry in entries.items():
        for made in packed.get(name, ()):
            out[made.name] = made
            new_origin[made.name] = tuple(o for p in made.pieces for o in origin.get(p.entry.name, (p.entry.name,)))
        if name in members:
            continue
        if name in out:
            raise UsageError(f"--experts packed: {name!r} exists already beside the per-expert tensors", code="key-collision")
        out[name] = entry
        new_origin[name] = origin.get(name, (name,))
    if family.moe_module != "mlp":
        out, new_origin = _rename_module(out, new_origin, f".{family.moe_module}.", ".mlp.", set(layers))
    return _detach_aliases(out), new_origin


def _unpack(entries, origin, family: Family, model_type: str):
    layers: dict[str, dict[str, TensorEntry]] = {}
    for name, entry in entries.items():
        match = PACKED_RE.match(name)
        if match:
            layers.setdefault(match["prefix"], {})[match["proj"]] = entry
    if not layers:
        _nothing_to_do(entries, "packed", model_type)
        return entries, origin
    positions = {name: i for i, name in enumerate(entries)}
    made: dict[str, list[PiecedEntry]] = {}
    for prefix, pair in layers.items():
        if set(pair) != {"gate_up_proj", "down_proj"}:
            missing = ({"gate_up_proj", "down_proj"} - set(pair)).pop()
            raise UsageError(f"--experts per-expert: {prefix}mlp.experts.{missing} is missing", code="experts-incomplete")
        gate_up, down = pair["gate_up_proj"], pair["down_proj"]
        if (
            len(gate_up.shape) != 3
            or len(down.shape) != 3
            or gate_up.shape[1] % 2
            or down.shape != (gate_up.shape[0], gate_up.shape[2], gate_up.shape[1] // 2)
            or gate_up.dtype != down.dtype
            or DTYPE_BITS[gate_up.dtype] % 8
        ):
            raise UsageError(
                f"--experts per-expert: {gate_up.name} {gate_up.dtype} {list(gate_up.shape)} and {down.name} {down.dtype} "
                f"{list(down.shape)} are not [E, 2I, H] and [E, H, I]",
                code="experts-mismatch",
            )
        count, double, hidden = gate_up.shape
        inner = double // 2
        size = DTYPE_BITS[gate_up.dtype] // 8
        block = inner * hidden * size
        module = f"{prefix}{family.moe_module}.experts"
        tensors = []
        for e in range(count):
            tensors.append(
                _pieced(f"{module}.{e}.{family.gate}.weight", gate_up, (inner, hidden), [Piece(gate_up, 2 * e * block, block)])
            )
            tensors.append(
                _pieced(
                    f"{module}.{e}.{family.up}.weight", gate_up, (inner, hidden), [Piece(gate_up, (2 * e + 1) * block, block)]
                )
            )
            tensors.append(_pieced(f"{module}.{e}.{family.down}.weight", down, (hidden, inner), [Piece(down, e * block, block)]))
        made[min(gate_up.name, down.name, key=positions.__getitem__)] = tensors

    members = {e.name for pair in layers.values() for e in pair.values()}
    out: dict[str, TensorEntry] = {}
    new_origin: dict[str, tuple[str, ...]] = {}
    for name, entry in entries.items():
        for tensor in made.get(name, ()):
            out[tensor.name] = tensor
            new_origin[tensor.name] = origin.get(tensor.pieces[0].entry.name, (tensor.pieces[0].entry.name,))
        if name not in members:
            if name in out:
                raise UsageError(f"--experts per-expert: {name!r} exists already beside the packed tensors", code="key-collision")
            out[name] = entry
            new_origin[name] = origin.get(name, (name,))
    if family.moe_module != "mlp":
        out, new_origin = _rename_module(out, new_origin, ".mlp.", f".{family.moe_module}.", set(layers))
    return _detach_aliases(out), new_origin


def _rename_module(entries, origin, old: str, new: str, prefixes: set[str]):
    """Rename the MoE module of the layers in ``prefixes`` (``X.block_sparse_moe.gate`` <-> ``X.mlp.gate``)."""
    starts = {prefix.rstrip(".") + old for prefix in prefixes}

    def renamed(name: str) -> str:
        for start in starts:
            if name.startswith(start):
                return start[: -len(old)] + new + name[len(start) :]
        return name

    new_name = {name: renamed(name) for name in entries}
    check_unique(new_name, "--experts")
    out = {}
    for name, entry in entries.items():
        target = new_name[name]
        alias = new_name.get(entry.alias_of) if entry.alias_of else None
        out[target] = replace(entry, name=target, alias_of=alias) if (target != name or alias != entry.alias_of) else entry
    return out, {new_name[name]: value for name, value in origin.items() if name in new_name}


def _whole(entry: TensorEntry) -> Piece:
    return Piece(entry, 0, entry.nbytes)


def _pieced(name: str, like: TensorEntry, shape: tuple[int, ...], pieces: list[Piece]) -> PiecedEntry:
    return PiecedEntry(
        name=name,
        dtype=like.dtype,
        shape=shape,
        nbytes=sum(p.nbytes for p in pieces),
        file=pieces[0].entry.file,
        offset=None,
        pieces=tuple(pieces),
    )


def _detach_aliases(entries: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
    """An alias of a tensor that was packed away owns its (same) bytes now."""
    return {
        name: replace(e, alias_of=None) if e.alias_of is not None and e.alias_of not in entries else e
        for name, e in entries.items()
    }


def _nothing_to_do(entries: dict, wanted_from: str, model_type: str) -> None:
    other = PACKED_RE if wanted_from == "per-expert" else None
    if other is not None and any(other.match(n) for n in entries):
        return  # already packed
    if wanted_from == "packed" and any(re.search(r"\.experts\.\d+\.", n) for n in entries):
        return  # already per expert
    raise UsageError(f"--experts: found no MoE expert tensors of a {model_type!r} model", code="experts-none")
