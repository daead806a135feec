"""Big-model inference: build empty, plan a device map, stream a checkpoint in, run with CPU/disk offload.

Same names and signatures as accelerate's big-model API, so switching is a change of import. Every name is
resolved lazily; ``shardkit.bigmodel.placement`` (used by ``shardkit plan``) never imports torch.
"""

from __future__ import annotations

from shardkit._lazy import lazy_exports

_EXPORTS = {
    "init_empty_weights": "shardkit.bigmodel.empty",
    "init_on_device": "shardkit.bigmodel.empty",
    "compute_module_sizes": "shardkit.bigmodel.measure",
    "find_tied_parameters": "shardkit.bigmodel.measure",
    "get_max_memory": "shardkit.bigmodel.devicemap",
    "get_balanced_memory": "shardkit.bigmodel.devicemap",
    "infer_auto_device_map": "shardkit.bigmodel.devicemap",
    "check_device_map": "shardkit.bigmodel.devicemap",
    "load_checkpoint_in_model": "shardkit.bigmodel.loader",
    "LoadResult": "shardkit.bigmodel.loader",
    "OffloadStore": "shardkit.bigmodel.offload",
    "dispatch_model": "shardkit.bigmodel.dispatch",
    "load_checkpoint_and_dispatch": "shardkit.bigmodel.dispatch",
    "cpu_offload": "shardkit.bigmodel.dispatch",
    "disk_offload": "shardkit.bigmodel.dispatch",
    "remove_hook_from_module": "shardkit.bigmodel.dispatch",
    "remove_hooks": "shardkit.bigmodel.dispatch",
    "OutOfMemoryError": "shardkit.bigmodel.hooks",
    "from_pretrained": "shardkit.bigmodel.pretrained",
    "plan_device_map": "shardkit.bigmodel.planning",
    "DevicePlan": "shardkit.bigmodel.planning",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports('shardkit.bigmodel', globals(), _EXPORTS)
