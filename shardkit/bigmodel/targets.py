"""A model's tensors as the loader and the dispatcher see them: each tensor once, with every name and place it has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from ..table import TensorEntry


class Place(NamedTuple):
    """Where a tensor lives in a model: ``module._parameters[attribute]`` (or ``_buffers``), filled from ``name``.

    In a :class:`Target` ``name`` is the place's own dotted name; in a hook's block it is the tensor's first name,
    the key of its slot (tied places share it).
    """

    module: Any
    attribute: str
    is_parameter: bool
    name: str


@dataclass(eq=False)
class Target:
    """One model tensor (all its names when tied) and where and how it is loaded."""

    names: list[str]
    places: list[Place]
    old: object
    persistent: bool
    entry: TensorEntry | None = None
    device: object = None  # torch.device, or "disk"
    dtype: object = None
    block: str = ""
    dest: object = None
    place_names: list = None  # the dotted name of each place

    def split(self, key) -> dict:
        """``{key(name): Target}`` holding only the places whose name maps to that key (tied weights used by
        several blocks give each block its own view of the tensor)."""
        parts: dict = {}
        for place, name in zip(self.places, self.place_names):
            part = parts.get(key(name))
            if part is None:
                part = parts[key(name)] = Target(
                    [], [], self.old, self.persistent, self.entry, self.device, self.dtype, self.block, self.dest, []
                )
            if name not in part.names:
                part.names.append(name)
            part.places.append(place)
            part.place_names.append(name)
        return parts


def model_tensors(model) -> list[Target]:
    """Every parameter and buffer of ``model`` once, with all the names and places it has (tied weights)."""
    by_id: dict[int, Target] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for table, is_param in ((module._parameters, True), (module._buffers, False)):
            for attr, tensor in table.items():
                if tensor is None:
                    continue
                target = by_id.get(id(tensor))
                if target is None:
                    persistent = is_param or attr not in module._non_persistent_buffers_set
                    target = by_id[id(tensor)] = Target([], [], tensor, persistent, place_names=[])
                name = dot + attr
                if name not in target.names:
                    target.names.append(name)
                target.places.append(Place(module, attr, is_param, name))
                target.place_names.append(name)
    return list(by_id.values())
