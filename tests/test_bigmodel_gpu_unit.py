"""CPU-checkable parts of the GPU path: the pinned region's lifetime, and faulting its pages in before registration."""

from __future__ import annotations

import gc
import mmap

import pytest
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


def _resident_pages(address: int, nbytes: int) -> int:
    """How many pages of ``[address, address + nbytes)`` are in memory (mincore)."""
    import ctypes

    page = mmap.PAGESIZE
    pages = -(-nbytes // page)
    vector = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(nbytes), vector) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vector)


@pytest.mark.parametrize("advice", ["populate", "zero-fill fallback"])
def test_populate_faults_in_every_page_of_a_fresh_mapping(monkeypatch, advice):
    import ctypes

    from shardkit.bigmodel import slab

    if advice != "populate":
        monkeypatch.setattr(slab, "_MADV_POPULATE_WRITE", 0x7FFF)  # an advice no kernel knows: madvise fails, memset runs
    nbytes = 3 * slab.POPULATE_PIECE + 5 * mmap.PAGESIZE + 17  # several pieces, the last one partial
    region = mmap.mmap(-1, nbytes)
    anchor = ctypes.c_char.from_buffer(region)
    address = ctypes.addressof(anchor)
    assert _resident_pages(address, nbytes) == 0
    slab.populate(address, nbytes)
    assert _resident_pages(address, nbytes) == -(-nbytes // mmap.PAGESIZE)
    assert region[:4096] == bytes(4096) and region[-17:] == bytes(17)  # present, and still zero
    del anchor
    region.close()
