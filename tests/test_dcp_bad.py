"""Bad DCP folders: hostile or broken .metadata, missing and truncated .distcp files, chunks that do not tile.

Every problem is one line with a stable code naming the file (exit 2; validate exits 1 and lists them all),
nothing is written, nothing in a hostile pickle runs.
"""

from __future__ import annotations

import os
import pickle
import shutil

import pytest
from cli_helpers import run_shardkit

from shardkit import open_checkpoint, validate
from shardkit.errors import CheckpointError, UnsafePickleError


@pytest.fixture
def tp(dcp_folders, tmp_path):
    folder = tmp_path / "tp"
    shutil.copytree(dcp_folders / "tp", folder)
    return folder


def rewrite_metadata(folder, change) -> None:
    """Load .metadata with torch's own classes, let ``change`` edit it, and save it back as torch would."""
    import torch.distributed.checkpoint  # noqa: F401  (registers the classes the pickle names)

    path = folder / ".metadata"
    metadata = pickle.loads(path.read_bytes())
    change(metadata)
    path.write_bytes(pickle.dumps(metadata, protocol=4))


def expect_error(folder, tmp_path, code: str, text: str) -> None:
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(folder)
    assert caught.value.code == code and text in str(caught.value), str(caught.value)
    result = run_shardkit("split", folder, tmp_path / "out")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and text in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
    report = validate(folder)
    assert code in report.codes and not report.ok
    result = run_shardkit("validate", folder)
    assert result.returncode == 1 and code in result.stdout


class Boom:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps(Boom(), protocol=4),
        pickle.dumps({"state_dict_metadata": Boom()}, protocol=2),
        # BUILD on what an allowed name gives: a plain dict, a stand-in function, a record class, torch.Size (tuple)
        b"\x80\x04}(X\x01\x00\x00\x00ai\x01}b.",
        b"\x80\x02cpathlib\nPosixPath\n}X\x05\x00\x00\x00_callK\x01sb.",
        b"\x80\x02cpathlib\nPosixPath\nN}X\x05\x00\x00\x00_callK\x01s\x86b.",
        b"\x80\x02ctorch.distributed.checkpoint.metadata\nMetadata\n}X\x07\x00\x00\x00versionK\x01sb.",
        b"\x80\x02ctorch\nSize\n}X\x07\x00\x00\x00versionK\x01sb.",
        # a record given a field it does not have
        b"\x80\x02ctorch.distributed.checkpoint.metadata\nMetadata\n)\x81}X\x04\x00\x00\x00evilK\x01sb.",
    ],
)
def test_hostile_metadata_runs_nothing(tp, tmp_path, monkeypatch, payload):
    shutil.copytree(tp, tp.parent / "clean")
    (tp / ".metadata").write_bytes(payload)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(tp)
    assert caught.value.code in ("unsafe-pickle", "dcp-metadata-invalid")
    assert str(tp / ".metadata") in str(caught.value)
    assert not (tmp_path / "PWNED").exists()
    # and the stand-ins are unchanged for the next load
    assert open_checkpoint(tp.parent / "clean").format == "dcp"


def test_os_system_is_named_and_refused(tp):
    (tp / ".metadata").write_bytes(pickle.dumps(Boom(), protocol=4))
    with pytest.raises(UnsafePickleError, match=r"posix\.system.*nothing was executed"):
        open_checkpoint(tp)


def test_metadata_that_is_not_dcp(tp, tmp_path):
    (tp / ".metadata").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    expect_error(tp, tmp_path, "dcp-metadata-invalid", "not DCP Metadata")


def test_missing_metadata(tp, tmp_path):
    (tp / ".metadata").unlink()
    expect_error(tp, tmp_path, "dcp-metadata-missing", ".metadata: is missing")


def test_missing_distcp(tp, tmp_path):
    (tp / "__2_0.distcp").unlink()
    expect_error(tp, tmp_path, "dcp-file-missing", "__2_0.distcp: is missing")


def test_truncated_distcp(tp, tmp_path):
    path = tp / "__1_0.distcp"
    os.truncate(path, path.stat().st_size - 100)
    expect_error(tp, tmp_path, "dcp-truncated", "__1_0.distcp")


def test_missing_embedded_record(tp, tmp_path):
    # rename the storage record of the first chunk in the file: data/0 -> data/9 (same length, zip still valid)
    path = tp / "__0_0.distcp"
    data = path.read_bytes()
    assert data.count(b"archive/data/0") >= 2
    path.write_bytes(data.replace(b"archive/data/0", b"archive/data/9", 2))
    expect_error(tp, tmp_path, "storage-missing", "__0_0.distcp")


def _chunks(metadata, name):
    return metadata.state_dict_metadata[name].chunks


def test_chunks_with_a_gap(tp, tmp_path):
    rewrite_metadata(tp, lambda m: _chunks(m, "col.weight").pop(1))
    expect_error(tp, tmp_path, "dcp-chunk-gap", "'col.weight'")


def test_overlapping_chunks(tp, tmp_path):
    import torch

    def change(m):
        chunk = _chunks(m, "col.weight")[1]
        chunk.offsets = torch.Size([0, 2])  # [0,2)+3 overlaps [0,3)

    rewrite_metadata(tp, change)
    expect_error(tp, tmp_path, "dcp-chunk-overlap", "'col.weight'")


def test_chunk_outside_the_tensor(tp, tmp_path):
    import torch

    def change(m):
        m.state_dict_metadata["col.weight"].size = torch.Size([8, 9])

    rewrite_metadata(tp, change)
    expect_error(tp, tmp_path, "dcp-chunk-out-of-bounds", "'col.weight'")


def test_byte_length_disagrees_with_dtype_and_size(tp, tmp_path):
    import torch

    def change(m):
        m.state_dict_metadata["col.weight"].properties.dtype = torch.float64

    rewrite_metadata(tp, change)
    expect_error(tp, tmp_path, "dcp-chunk-mismatch", "F64")


def test_validate_lists_every_problem(tp):
    (tp / "__2_0.distcp").unlink()
    path = tp / "__1_0.distcp"
    os.truncate(path, 5000)
    report = validate(tp)
    assert {"dcp-file-missing", "dcp-truncated"} <= report.codes
    assert sum(f.code == "dcp-file-missing" for f in report.findings) == 1  # once per file, not per tensor
    assert all(f.file in ("__1_0.distcp", "__2_0.distcp") for f in report.findings)


def _storage(metadata, name):
    return next(info for key, info in metadata.storage_data.items() if key.fqn == name)


def test_a_chunk_path_leaving_the_folder(tp, tmp_path):
    rewrite_metadata(tp, lambda m: setattr(_storage(m, "col.weight"), "relative_path", "../__0_0.distcp"))
    expect_error(tp, tmp_path, "path-escapes-folder", "points outside the checkpoint folder")


def test_compressed_chunks_are_refused(tp, tmp_path):
    rewrite_metadata(tp, lambda m: setattr(_storage(m, "col.weight"), "transform_descriptors", ["zstd"]))
    expect_error(tp, tmp_path, "dcp-transformed", "['zstd']")
