"""The loader's I/O engines: chunked read-ahead from several threads, and parallel reads straight into place."""

from __future__ import annotations

import os

import pytest
import torch

from shardkit import CheckpointError
from shardkit.bigmodel.readahead import ReadAhead


@pytest.mark.parametrize("threads,depth,chunk", [(1, 3, 64), (4, 8, 64), (4, 4, 1000), (3, 3, 8)])
def test_every_byte_arrives_once_whatever_the_order(tmp_path, threads, depth, chunk):
    data = os.urandom(20_000)
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "b").write_bytes(data[::-1])
    jobs = [(str(tmp_path / "a"), 8, 5000), (str(tmp_path / "b"), 0, 20_000), (str(tmp_path / "a"), 19_000, 1000)]
    got = [bytearray(n) for _, _, n in jobs]
    seen = 0
    reader = ReadAhead(jobs, chunk=chunk, depth=depth, threads=threads)
    try:
        for piece in reader:
            got[piece.job][piece.start : piece.start + piece.nbytes] = piece.data.numpy().tobytes()
            seen += piece.nbytes
            reader.release(piece)
    finally:
        reader.close()
    assert seen == sum(n for _, _, n in jobs)
    assert bytes(got[0]) == data[8:5008] and bytes(got[1]) == data[::-1] and bytes(got[2]) == data[19_000:]
    assert len(reader.buffers) == max(depth, min(threads, len(reader.pieces)))  # bounded ring, allocated once


def test_a_file_shorter_than_its_ranges_is_a_clear_error(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 100)
    reader = ReadAhead([(str(tmp_path / "a"), 0, 400)], chunk=64, threads=2)
    try:
        with pytest.raises(CheckpointError, match="short of the data it declares") as info:
            for piece in reader:
                reader.release(piece)
        assert info.value.code == "short-read"
    finally:
        reader.close()


def test_parallel_direct_reads_fill_destinations(tmp_path):
    from builders import save_safetensors

    from shardkit import open_checkpoint
    from shardkit.bigmodel.readahead import read_direct

    state = {f"t{i}": torch.randn(1000 + i) for i in range(7)}
    save_safetensors(state, tmp_path / "m.safetensors")
    checkpoint = open_checkpoint(tmp_path / "m.safetensors")
    dests = {name: torch.empty_like(t) for name, t in state.items()}
    read_direct([(checkpoint[name], dests[name].view(torch.uint8)) for name in state], piece=1024, threads=3)
    assert all(torch.equal(dests[n], state[n]) for n in state)
