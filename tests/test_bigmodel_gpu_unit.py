"""CPU-checkable parts of the GPU path: the pinned region's lifetime."""

from __future__ import annotations

import gc

import torch

from shardkit.bigmodel.slab import _PinnedRegion


def test_pinned_region_unregisters_after_the_last_view_dies():
    calls = []
    region = _PinnedRegion(-1, 8192)
    tensor = torch.frombuffer(region, dtype=torch.uint8)
    region.registered, region.unregister = tensor.data_ptr(), calls.append
    view = tensor[100:200]
    del tensor, region
    gc.collect()
    assert calls == []  # a view still uses the memory: still registered
    view.fill_(7)
    assert int(view.sum()) == 700
    del view
    gc.collect()
    assert len(calls) == 1
