"""The byte mover: every method (copy_file_range, sendfile, buffered) copies exactly and reports short sources."""

from __future__ import annotations

import os

import pytest

from shardkit.errors import CheckpointError
from shardkit.write import byteio as copy

METHODS = {
    "copy_file_range": {"copy_file_range": True, "sendfile": True},
    "sendfile": {"copy_file_range": False, "sendfile": True},
    "buffered": {"copy_file_range": False, "sendfile": False},
}


@pytest.fixture(params=list(METHODS))
def method(request, monkeypatch):
    monkeypatch.setattr(copy, "_methods", dict(METHODS[request.param]))
    return request.param


def files(tmp_path, data: bytes):
    (tmp_path / "src").write_bytes(data)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT)
    return src, dst


@pytest.mark.parametrize(
    "src_offset, dst_offset, count", [(0, 0, 3 * 4096 + 5), (64, 8, 3 * 4096), (4096 + 64, 64, 50_000), (7, 7, 1), (10, 0, 0)]
)
def test_copies_exact_ranges(tmp_path, method, src_offset, dst_offset, count):
    data = os.urandom(60_000)
    src, dst = files(tmp_path, data)
    try:
        os.pwrite(dst, b"\xaa" * dst_offset, 0)
        copy.copy_range(src, src_offset, dst, dst_offset, count, "src")
        written = os.pread(dst, dst_offset + count + 10, 0)
    finally:
        os.close(src), os.close(dst)
    assert written == b"\xaa" * dst_offset + data[src_offset : src_offset + count]


def test_buffered_copy_small_buffer_and_crc(tmp_path, monkeypatch):
    import zlib

    monkeypatch.setattr(copy, "BUFFER_SIZE", 1000)
    data = os.urandom(10_500)
    src, dst = files(tmp_path, data)
    try:
        crc = copy.copy_buffered(src, 100, dst, 0, 10_000, "src", crc=0)
        assert os.pread(dst, 20_000, 0) == data[100:10_100]
    finally:
        os.close(src), os.close(dst)
    assert crc == zlib.crc32(data[100:10_100])


@pytest.mark.parametrize("src_offset", [0, 64])
def test_short_source_raises(tmp_path, method, src_offset):
    src, dst = files(tmp_path, os.urandom(9000))
    try:
        with pytest.raises(CheckpointError, match="bytes short of the data it declares") as error:
            copy.copy_range(src, src_offset, dst, 0, 10_000, "src")
    finally:
        os.close(src), os.close(dst)
    assert error.value.code == "short-read"


def test_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(copy, "BUFFER_SIZE", 512)
    data = os.urandom(5000)
    src, dst = files(tmp_path, data)
    try:
        os.pwrite(dst, data[100:], 0)
        assert copy.same_bytes(src, 100, dst, 0, 4900, "a", "b")
        os.pwrite(dst, b"\x00" if data[4000] else b"\x01", 3900)
        assert not copy.same_bytes(src, 100, dst, 0, 4900, "a", "b")
        os.pwrite(dst, data[4000:4001], 3900)
        with pytest.raises(CheckpointError):  # equal as far as both go, then the source ends
            copy.same_bytes(src, 100, dst, 0, 6000, "a", "b")
    finally:
        os.close(src), os.close(dst)
