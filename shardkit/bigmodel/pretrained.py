"""``shardkit.from_pretrained``: the one call for transformers users, config to a dispatched model.

The model is built from its config with the architecture's own class on the meta device, then streamed in and
dispatched by :func:`~shardkit.bigmodel.dispatch.load_checkpoint_and_dispatch`: the same steps as the README's
three-line recipe, and the same model transformers' ``from_pretrained`` gives for the same device map.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError

CONFIG_NAME = "config.json"


def from_pretrained(
    repo_or_path: str | os.PathLike,
    device_map="auto",
    max_memory: dict | None = None,
    dtype=None,
    offload_folder: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    variant: str | None = None,
    token: str | bool | None = None,
    no_split_module_classes=None,
    offload_buffers: bool = False,
    strict: bool = False,
):
    """Build ``repo_or_path``'s model from its ``config.json`` and load it with shardkit; returns it in eval mode.

    ``repo_or_path`` is a local folder holding ``config.json`` and a checkpoint, or a Hub repo id: then only the
    config and the checkpoint files are downloaded (files already in the Hugging Face cache are not fetched
    again; with ``HF_HUB_OFFLINE=1`` or no network, a cached snapshot is used). ``device_map``, ``max_memory``,
    ``offload_folder``, ``no_split_module_classes``, ``offload_buffers`` and ``strict`` are
    :func:`~shardkit.load_checkpoint_and_dispatch`'s (``device_map=None`` loads on the CPU without hooks).
    ``dtype``: the dtype floating weights are loaded in (``"bf16"``, ``torch.float16``...); ``None`` or ``"auto"``
    takes the config's ``dtype``, else the checkpoint's own, as transformers' ``dtype="auto"`` does. Needs
    transformers.
    """
    import torch
    import transformers

    from .dispatch import load_checkpoint_and_dispatch
    from .empty import init_empty_weights
    from .measure import as_torch_dtype

    folder = _local_folder(repo_or_path, revision=revision, subfolder=subfolder, variant=variant, token=token)
    config = transformers.AutoConfig.from_pretrained(folder)
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or _checkpoint_dtype(folder) or torch.float32
    dtype = as_torch_dtype(dtype)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        model_class = transformers.AutoModel._model_mapping[type(config)]
    with init_empty_weights():
        model = model_class._from_config(config, dtype=dtype)
    model = load_checkpoint_and_dispatch(
        model,
        folder,
        device_map=device_map,
        max_memory=max_memory,
        no_split_module_classes=no_split_module_classes,
        offload_folder=offload_folder,
        offload_buffers=offload_buffers,
        dtype=dtype,
        strict=strict,
    )
    model.eval()
    return model


def _local_folder(repo_or_path, *, revision, subfolder, variant, token) -> Path:
    """The folder holding the config and the checkpoint: ``repo_or_path`` itself, or its cache snapshot."""
    path = Path(os.fspath(repo_or_path)).expanduser()
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not (folder / CONFIG_NAME).is_file():
            raise CheckpointError(folder, f"holds no {CONFIG_NAME}: from_pretrained builds the model from it", code="no-config")
        return folder
    from ..hub.cache import open_repo, write_ref
    from ..hub.download import fetch_checkpoint, fetch_files

    repo_id = os.fspath(repo_or_path)
    repo = open_repo(repo_id, revision=revision, subfolder=subfolder, token=token)
    if isinstance(repo, Path):  # offline, or the Hub can't be reached: the cached snapshot
        if not (repo / CONFIG_NAME).is_file():
            raise CheckpointError(repo, f"(cached snapshot of {repo_id}) holds no {CONFIG_NAME}", code="no-config")
        return repo
    if repo.size(CONFIG_NAME) is None:
        raise CheckpointError(repo.label, f"holds no {CONFIG_NAME}: from_pretrained builds the model from it", code="no-config")
    fetch_files(repo, [CONFIG_NAME])
    folder = fetch_checkpoint(repo, repo.select_checkpoint(variant))
    write_ref(repo_id, revision, repo.commit, repo_type=repo.repo_type)
    return folder


def _checkpoint_dtype(folder: Path):
    """The floating dtype most of the checkpoint's bytes are in (transformers' ``dtype="auto"``), or None."""
    from ..dtypes import FLOATING, torch_dtype
    from ..reader import open_checkpoint

    totals: dict[str, int] = {}
    for entry in open_checkpoint(folder):
        if entry.alias_of is None and entry.dtype in FLOATING:
            totals[entry.dtype] = totals.get(entry.dtype, 0) + entry.nbytes
    return torch_dtype(max(totals, key=totals.get)) if totals else None
