"""CPU-checkable parts of the GPU path: the pinned region's lifetime, and faulting its pages in before registration."""

from __future__ import annotations

import gc
import mmap
import os
import signal

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


class _FakeCudart:
    """Stands in for torch.cuda.cudart() on a machine without CUDA: registration succeeds and is recorded."""

    def __init__(self):
        self.registered, self.unregistered = [], []

    def cudaHostRegister(self, address, nbytes, flags):
        self.registered.append((address, nbytes))
        return 0

    def cudaHostUnregister(self, address):
        self.unregistered.append(address)
        return 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_pinned_slab_is_registered_populated_and_left_out_of_forks(monkeypatch):
    import ctypes

    from shardkit.bigmodel import slab

    fake = _FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    nbytes = 2 * slab.POPULATE_PIECE + 4096
    tensor = slab._pinned(nbytes)
    address = tensor.data_ptr()
    assert fake.registered == [(address, nbytes)] and tensor.numel() == nbytes
    assert _resident_pages(address, nbytes) == -(-nbytes // mmap.PAGESIZE)  # faulted in before registration
    tensor[-1] = 7
    pid = os.fork()
    if pid == 0:  # the child: the mapping must not exist here
        try:
            import faulthandler
            import resource

            faulthandler.disable()  # die of the signal quietly, without a traceback or a core file
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            ctypes.string_at(address + nbytes - 1, 1)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
    assert int(tensor[-1]) == 7  # the parent's pages are untouched
    del tensor
    gc.collect()
    assert fake.unregistered == [address]
