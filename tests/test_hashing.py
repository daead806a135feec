"""shardkit.hashing: digests equal hashlib's and sha256sum's, for every size around the read piece."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest

from shardkit.errors import CheckpointError
from shardkit.hashing import PIECE, sha256_file, sha256_files, sha256_ranges


@pytest.fixture
def files(tmp_path):
    import random

    rng = random.Random(16)
    sizes = [0, 1, 63, 64, 65, 127, 128, 129, 1000, 4096 + 7]
    paths = []
    for size in sizes:
        path = tmp_path / f"f{size}.bin"
        path.write_bytes(rng.randbytes(size))
        paths.append(path)
    return paths


def test_whole_files_match_hashlib_at_every_piece_boundary(files):
    for path in files:
        expected = hashlib.sha256(path.read_bytes()).hexdigest()
        for piece in (64, 100, 1 << 20):
            seen = []
            assert sha256_file(path, piece=piece, progress=seen.append) == expected
            assert sum(seen) == path.stat().st_size


def test_many_files_keep_their_order_and_match(files):
    result = sha256_files(files, workers=3)
    assert list(result) == [str(p) for p in files]
    assert result == {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="no sha256sum")
def test_same_digest_as_sha256sum(files):
    path = files[-1]
    out = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True).stdout
    assert sha256_file(path, piece=64) == out.split()[0]


def test_byte_ranges(files):
    path = files[-1]
    data = path.read_bytes()
    ranges = [(0, 10), (7, 4000), (4096, 7), (100, 0)]
    assert sha256_ranges(path, ranges, workers=2) == [hashlib.sha256(data[s : s + n]).hexdigest() for s, n in ranges]


def test_file_shorter_than_the_range_is_an_error_not_a_digest(files):
    path = files[-1]
    for piece in (64, PIECE):  # the threaded path and the one-read path
        with pytest.raises(CheckpointError, match="bytes short of the data it declares") as raised:
            sha256_file(path, start=10, length=path.stat().st_size, piece=piece)
        assert raised.value.code == "short-read" and str(path) in str(raised.value)


def test_missing_file_raises_oserror(tmp_path, files):
    with pytest.raises(FileNotFoundError):
        sha256_files([files[0], tmp_path / "nope"], workers=2)
