"""Build models without allocating their weights: parameters (and optionally buffers) land on the meta device.

Same contract as accelerate's context managers of the same names, so ``from shardkit import init_empty_weights``
is a drop-in replacement.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def init_on_device(device, include_buffers: bool = False) -> Iterator[None]:
    """Inside this context, every parameter a module registers is moved to ``device`` as it is registered.

    With ``include_buffers=True`` buffers go there too, and so does every tensor created by a factory function
    (``torch.empty``, ``torch.zeros``...) inside the context. Parameter subclasses keep their class and attributes.
    """
    import torch
    from torch import nn

    device = torch.device(device)
    register_parameter = nn.Module.register_parameter
    register_buffer = nn.Module.register_buffer

    def move_parameter(module, name, param):
        register_parameter(module, name, param)
        if param is None or param.device == device:
            return
        old = module._parameters[name]
        if type(old) is nn.Parameter:
            new = nn.Parameter(old.data.to(device), requires_grad=old.requires_grad)
            new.__dict__.update(old.__dict__)
        else:  # subclasses (quantized parameters...) take their attributes as constructor keywords
            new = type(old)(old.data.to(device), **{**old.__dict__, "requires_grad": old.requires_grad})
        module._parameters[name] = new

    def move_buffer(module, name, tensor, persistent=True):
        register_buffer(module, name, tensor, persistent=persistent)
        if tensor is not None:
            module._buffers[name] = module._buffers[name].to(device)

    nn.Module.register_parameter = move_parameter
    if include_buffers:
        nn.Module.register_buffer = move_buffer
    try:
        with device if include_buffers else contextlib.nullcontext():
            yield
    finally:
        nn.Module.register_parameter = register_parameter
        nn.Module.register_buffer = register_buffer


@contextlib.contextmanager
def init_empty_weights(include_buffers: bool = False) -> Iterator[None]:
    """Build models on the meta device: no memory for parameters (and buffers with ``include_buffers=True``).

    Buffers stay real by default because many models compute them in ``__init__`` (rotary tables, position ids)
    and the checkpoint does not always hold them.
    """
    with init_on_device("meta", include_buffers=include_buffers):
        yield


def empty_model_from_config(config_path: str):
    """The transformers model a ``config.json`` (or its folder) describes, with empty weights.

    The class is the config's first ``architectures`` entry when transformers has it (``BertModel``, not a guessed
    head), else ``AutoModel``'s choice. Imports torch and transformers.
    """
    import os

    import transformers

    folder = os.path.dirname(config_path) if config_path.endswith(".json") else config_path
    config = transformers.AutoConfig.from_pretrained(folder)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    with init_empty_weights():
        if model_class is not None and hasattr(model_class, "_from_config"):
            return model_class._from_config(config)
        return transformers.AutoModel.from_config(config)
