"""shardkit.fileio: the one exact-read / exact-write / count check used by the read side and the write side."""

from __future__ import annotations

import os

import pytest

from shardkit.errors import CheckpointError
from shardkit.fileio import is_count, read_exact, read_into, short_read, write_all


def test_read_exact_and_read_into_fill_the_buffer(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 10)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_exact(fd, 300, 100, str(path)) == (bytes(range(256)) * 10)[100:400]
        dest = bytearray(10)
        read_into(fd, memoryview(dest)[2:], 5, str(path))
        assert dest == bytes(2) + bytes(range(5, 13))
        assert read_exact(fd, 0, 10_000, str(path)) == b""
    finally:
        os.close(fd)


def test_a_short_file_is_one_clear_error_naming_file_offset_and_missing_bytes(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(CheckpointError) as info:
            read_exact(fd, 50, 80, str(path))
        assert info.value.code == "short-read"
        assert (
            str(info.value) == f"{path}: file ends at byte 100, 30 bytes short of the data it declares (truncated since opened?)"
        )
        with pytest.raises(CheckpointError) as info:
            read_into(fd, bytearray(8), 96, str(path), code="offload-changed")
        assert info.value.code == "offload-changed" and "ends at byte 100, 4 bytes short" in str(info.value)
    finally:
        os.close(fd)
    assert str(short_read("p", 7, 3)) == "p: file ends at byte 7, 3 bytes short of the data it declares (truncated since opened?)"


def test_write_all_writes_every_byte_at_the_offset(tmp_path):
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        write_all(fd, b"abc", 0)
        write_all(fd, memoryview(bytearray(b"0123456789")), 5)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"abc\0\x000123456789"


@pytest.mark.parametrize(
    ("value", "limit", "expected"),
    [(0, None, True), (5, None, True), (-1, None, False), (True, None, False), (1.0, None, False), ("3", None, False),
     (2**64 - 1, 2**64, True), (2**64, 2**64, False), (None, None, False)],
)  # fmt: skip
def test_is_count(value, limit, expected):
    assert is_count(value, limit) is expected
