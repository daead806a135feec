"""Build models without allocating their weights: parameters (and optionally buffers) land on the meta device.

Same contract as accelerate's context managers of the same names, so ``from shardkit import init_empty_weights``
is a drop-in replacement.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

# The contexts below are per thread: torch's global registration hooks (installed while any context is open)
# consult this thread-local stack, so a module another thread builds meanwhile is left alone, and no nn.Module
# method is ever replaced.
_local = threading.local()
_hooks_lock = threading.Lock()
_hooks: list = []  # the registration hook handles while any context is open
_open = 0


def _stack() -> list:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def _moved_parameter(param, device):
    from torch import nn

    if type(param) is not nn.Parameter:
        try:  # subclasses such as bitsandbytes' take their attributes as constructor keywords
            return type(param)(param.data.to(device), **{**param.__dict__, "requires_grad": param.requires_grad})
        except TypeError:
            pass
    new = type(param)(param.data.to(device), requires_grad=param.requires_grad)
    new.__dict__.update(param.__dict__)
    return new


def _on_parameter(module, name, param):
    stack = getattr(_local, "stack", None)
    if not stack or param is None or param.device == stack[-1][0]:
        return None
    return _moved_parameter(param, stack[-1][0])


def _on_buffer(module, name, tensor):
    stack = getattr(_local, "stack", None)
    if not stack or not stack[-1][1] or tensor is None or tensor.device == stack[-1][0]:
        return None
    return tensor.to(stack[-1][0])


@contextlib.contextmanager
def _registration_hooks() -> Iterator[None]:
    global _open
    from torch.nn.modules import module as torch_module

    with _hooks_lock:
        if _open == 0:
            _hooks.append(torch_module.register_module_parameter_registration_hook(_on_parameter))
            _hooks.append(torch_module.register_module_buffer_registration_hook(_on_buffer))
        _open += 1
    try:
        yield
    finally:
        with _hooks_lock:
            _open -= 1
            if _open == 0:
                while _hooks:
                    _hooks.pop().remove()


def _include_buffers(flag: bool | None) -> bool:
    if flag is not None:
        return bool(flag)
    return os.environ.get("ACCELERATE_INIT_INCLUDE_BUFFERS", "").strip().lower() in ("1", "true", "yes", "on", "y", "t")


@contextlib.contextmanager
def init_on_device(device, include_buffers: bool | None = None) -> Iterator[None]:
    """Inside this context, every parameter a module registers in this thread is moved to ``device`` as it is registered.

    With ``include_buffers=True`` buffers go there too, and so does every tensor created by a factory function
    (``torch.empty``, ``torch.zeros``...) in this thread inside the context. Parameter subclasses keep their class
    and attributes. Other threads are not affected, and ``nn.Module``'s methods are not replaced.
    """
    import torch

    device = torch.device(device)
    include_buffers = _include_buffers(include_buffers)
    stack = _stack()
    with _registration_hooks():
        stack.append((device, include_buffers))
        try:
            with device if include_buffers else contextlib.nullcontext():
                yield
        finally:
            stack.pop()


@contextlib.contextmanager
def init_empty_weights(include_buffers: bool | None = None) -> Iterator[None]:
    """Build models on the meta device: no memory for parameters (and buffers with ``include_buffers=True``).

    Buffers stay real by default because many models compute them in ``__init__`` (rotary tables, position ids)
    and the checkpoint does not always hold them. ``include_buffers=None`` reads accelerate's switch, the
    ``ACCELERATE_INIT_INCLUDE_BUFFERS`` environment variable (``1``/``true``/``yes``/``on``).
    """
    with init_on_device("meta", include_buffers=include_buffers):
        yield


def empty_model_from_config(config_path: str):
    """The transformers model a ``config.json`` (or its folder) describes, with empty weights.

    The class is the config's first ``architectures`` entry when transformers has it (``BertModel``, not a guessed
    head), else ``AutoModel``'s choice. Imports torch and transformers.
    """

    import transformers

    folder = os.path.dirname(config_path) if config_path.endswith(".json") else config_path
    config = transformers.AutoConfig.from_pretrained(folder)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    with init_empty_weights():
        if model_class is not None and hasattr(model_class, "_from_config"):
            return model_class._from_config(config)
        return transformers.AutoModel.from_config(config)
