"""shardkit: inspect, reshard, convert, validate and load large PyTorch checkpoints.

``import shardkit`` is cheap and never imports torch: public names are resolved on first use.
"""

from __future__ import annotations

from shardkit._lazy import lazy_exports

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    "open_checkpoint": "shardkit.reader",
    "read_index": "shardkit.reader",
    "open_file": "shardkit.formats",
    "Checkpoint": "shardkit.table",
    "TensorEntry": "shardkit.table",
    "FileInfo": "shardkit.table",
    "IndexInfo": "shardkit.table",
    "Storage": "shardkit.table",
    "summarize": "shardkit.inspect",
    "load_tensor": "shardkit.materialize",
    "parse_size": "shardkit.units",
    "split": "shardkit.write",
    "convert": "shardkit.write",
    "run_split": "shardkit.write",
    "run_convert": "shardkit.write",
    "WriteSummary": "shardkit.write",
    "validate": "shardkit.validation.api",
    "Report": "shardkit.validation.report",
    "Finding": "shardkit.validation.report",
    "download_checkpoint": "shardkit.hub.download",
    "open_remote_checkpoint": "shardkit.sources",
    "open_source": "shardkit.sources",
    "ShardkitError": "shardkit.errors",
    "CheckpointError": "shardkit.errors",
    "NotACheckpointError": "shardkit.errors",
    "HubError": "shardkit.errors",
    "UnsafePickleError": "shardkit.errors",
    "UnsafePathError": "shardkit.errors",
    "UsageError": "shardkit.errors",
    "OutputError": "shardkit.errors",
    "init_empty_weights": "shardkit.bigmodel",
    "init_on_device": "shardkit.bigmodel",
    "compute_module_sizes": "shardkit.bigmodel",
    "find_tied_parameters": "shardkit.bigmodel",
    "get_max_memory": "shardkit.bigmodel",
    "get_balanced_memory": "shardkit.bigmodel",
    "infer_auto_device_map": "shardkit.bigmodel",
    "check_device_map": "shardkit.bigmodel",
    "load_checkpoint_in_model": "shardkit.bigmodel",
    "dispatch_model": "shardkit.bigmodel",
    "load_checkpoint_and_dispatch": "shardkit.bigmodel",
    "cpu_offload": "shardkit.bigmodel",
    "disk_offload": "shardkit.bigmodel",
    "remove_hook_from_module": "shardkit.bigmodel",
    "remove_hooks": "shardkit.bigmodel",
    "plan_device_map": "shardkit.bigmodel.planning",
    "from_pretrained": "shardkit.bigmodel",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports('shardkit', globals(), _EXPORTS)
