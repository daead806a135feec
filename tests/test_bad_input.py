"""Every kind of bad file gets a typed error naming the file and the problem, and the CLI one line and exit 2."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from builders import save_bin, save_safetensors, save_sharded, varied_state_dict

from shardkit import CheckpointError, NotACheckpointError, UnsafePathError, UnsafePickleError, open_checkpoint
from shardkit.formats.safetensors import build_header

REPO = Path(__file__).parents[1]


def write_safetensors(path: Path, header: dict | bytes, data: bytes = b"", declared_length: int | None = None) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(body) if declared_length is None else declared_length
    path.write_bytes(struct.pack("<Q", length) + body + data)
    return path


def entry(dtype="F32", shape=(2,), begin=0, end=8):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


SAFETENSORS_CASES = {
    "too-small": (b"\x01\x02", None, "sf-too-small"),
    "header-too-large": ({"a": entry()}, 100_000_001, "sf-header-too-large"),
    "header-length-2^63": ({"a": entry()}, 2**63, "sf-header-too-large"),
    "header-past-eof": ({"a": entry()}, 5000, "sf-header-past-eof"),
    "not-utf8": (b'{"a\xff": 1}', None, "sf-header-not-utf8"),
    "not-json": (b'{"a": ', None, "sf-header-json"),
    "not-an-object": (b"[1, 2]", None, "sf-header-json"),
    "unknown-dtype": ({"a": entry(dtype="F128")}, None, "sf-unknown-dtype"),
    "metadata-not-strings": ({"__metadata__": {"n": 1}, "a": entry()}, None, "sf-bad-metadata"),
    "negative-shape": ({"a": entry(shape=(-2,))}, None, "sf-bad-entry"),
    "range-lies-about-shape": ({"a": entry(shape=(3,))}, None, "sf-size-mismatch"),
    "gap": ({"a": entry(begin=0, end=8), "b": entry(begin=12, end=20)}, None, "sf-offsets"),
    "overlap": ({"a": entry(begin=0, end=8), "b": entry(begin=4, end=12)}, None, "sf-offsets"),
    "not-starting-at-zero": ({"a": entry(begin=8, end=16)}, None, "sf-offsets"),
    "end-before-begin": ({"a": entry(begin=8, end=0)}, None, "sf-offsets"),
}


@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_broken_safetensors_header(tmp_path, case):
    header, declared, code = SAFETENSORS_CASES[case]
    path = tmp_path / "model.safetensors"
    if case == "too-small":
        path.write_bytes(header)
    else:
        write_safetensors(path, header, b"\0" * 16, declared)
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    assert info.value.code == code
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)


def test_truncated_and_padded_safetensors(tmp_path):
    path = save_safetensors(varied_state_dict(), tmp_path / "model.safetensors")
    good = path.read_bytes()
    path.write_bytes(good[:-3])
    with pytest.raises(CheckpointError, match="truncated") as info:
        open_checkpoint(path)
    assert info.value.code == "sf-truncated"
    path.write_bytes(good + b"junk")
    with pytest.raises(CheckpointError, match="4 bytes after the last tensor") as info:
        open_checkpoint(path)
    assert info.value.code == "sf-trailing-bytes"


def test_lfs_pointer_and_html_page(tmp_path):
    lfs = tmp_path / "lfs.safetensors"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12345\n")
    with pytest.raises(NotACheckpointError, match="Git LFS pointer") as info:
        open_checkpoint(lfs)
    assert info.value.code == "lfs-pointer"
    html = tmp_path / "model.safetensors"
    html.write_text("\n<!DOCTYPE html><html><body>502 Bad Gateway</body></html>")
    with pytest.raises(NotACheckpointError, match="HTML") as info:
        open_checkpoint(html)
    assert info.value.code == "html-page"


def rewrite_zip(source: Path, target: Path, replace: dict[str, bytes] | None = None, compress: set[str] = frozenset()) -> Path:
    """Copy a torch zip member by member, replacing some members' bytes and compressing others."""
    replace = replace or {}
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            data = replace.get(info.filename.split("/", 1)[1], src.read(info.filename))
            method = zipfile.ZIP_DEFLATED if info.filename.split("/", 1)[1] in compress else zipfile.ZIP_STORED
            dst.writestr(info.filename, data, compress_type=method)
    return target


def test_compressed_record_is_refused(tmp_path):
    good = save_bin(varied_state_dict(), tmp_path / "good.bin")
    bad = rewrite_zip(good, tmp_path / "pytorch_model.bin", compress={"data/0"})
    with pytest.raises(CheckpointError, match="compressed") as info:
        open_checkpoint(bad)
    assert info.value.code == "zip-compressed"


class _RunShell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"w": _RunShell(f"touch {marker}")}, protocol=2)
    good = save_bin({"w": torch.ones(2)}, tmp_path / "good.bin")
    bad = rewrite_zip(good, tmp_path / "evil.bin", replace={"data.pkl": payload})
    with pytest.raises(UnsafePickleError, match=r"posix\.system|os\.system") as info:
        open_checkpoint(bad)
    assert "nothing was executed" in str(info.value)
    assert not marker.exists()
    # torch's own weights-only loader refuses it too; full pickle would have run it.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(bad, weights_only=True)
    assert not marker.exists()


def test_pickle_build_cannot_rewrite_stand_ins(tmp_path):
    # GLOBAL torch._utils._rebuild_tensor_v2, then BUILD with a state that would replace its __code__.
    payload = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x08\x00\x00\x00__code__K\x01s\x86b."
    good = save_bin({"w": torch.ones(2)}, tmp_path / "good.bin")
    bad = rewrite_zip(good, tmp_path / "build.bin", replace={"data.pkl": payload})
    with pytest.raises(UnsafePickleError, match="BUILD"):
        open_checkpoint(bad)
    # The stand-in is untouched and still works for the next file.
    from shardkit.formats import unpickler
    from shardkit.materialize import load_tensor

    assert unpickler._tensor_v2.__code__.co_name == "_tensor_v2"
    assert torch.equal(load_tensor(open_checkpoint(good)["w"]), torch.ones(2))


def test_storage_that_lies_about_its_size(tmp_path):
    good = save_bin({"w": torch.ones(4)}, tmp_path / "good.bin")
    bad = rewrite_zip(good, tmp_path / "short.bin", replace={"data/0": b"\0" * 8})
    with pytest.raises(CheckpointError, match="claims 4 F32 elements") as info:
        open_checkpoint(bad)
    assert info.value.code == "storage-size-mismatch"


def test_view_past_the_end_of_its_storage(tmp_path):
    base = torch.arange(8.0)
    good = save_bin({"w": base[2:4]}, tmp_path / "good.bin")
    raw = zipfile.ZipFile(good).read("good/data.pkl")
    # storage_offset 2 -> 7: the 2-element view would end at element 9 of an 8-element storage.
    bad_pkl = raw.replace(b"K\x02K\x02\x85", b"K\x07K\x02\x85", 1)
    assert bad_pkl != raw
    bad = rewrite_zip(good, tmp_path / "past.bin", replace={"data.pkl": bad_pkl})
    with pytest.raises(CheckpointError, match="past the end of its storage") as info:
        open_checkpoint(bad)
    assert info.value.code == "storage-too-short"


def test_truncated_zip(tmp_path):
    good = save_bin(varied_state_dict(), tmp_path / "good.bin")
    bad = tmp_path / "pytorch_model.bin"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        open_checkpoint(bad)
    assert info.value.code == "zip-corrupt"


def test_not_a_state_dict(tmp_path):
    path = save_bin([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list") as info:
        open_checkpoint(path)
    assert info.value.code == "not-a-state-dict"


def test_garbage_bin(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(NotACheckpointError, match="neither a torch zip"):
        open_checkpoint(path)


@pytest.mark.parametrize(
    "name", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", "C:\\x.safetensors", "..\\x.safetensors"]
)
def test_index_entry_escaping_the_folder(tmp_path, name):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_safetensors({"w": torch.ones(2)}, tmp_path / "outside.safetensors")
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 8}, "weight_map": {"w": name}}))
    with pytest.raises(UnsafePathError, match="outside the checkpoint folder") as info:
        open_checkpoint(folder)
    assert info.value.path == str(index)


def test_symlink_escaping_the_folder(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_safetensors({"w": torch.ones(2)}, tmp_path / "outside.safetensors")
    (folder / "model-00001-of-00001.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 8}, "weight_map": {"w": "model-00001-of-00001.safetensors"}})
    )
    with pytest.raises(UnsafePathError, match="symlink"):
        open_checkpoint(folder)


def test_index_naming_a_missing_file_or_tensor(tmp_path):
    folder = save_sharded(varied_state_dict(), tmp_path / "ckpt", max_shard_size=500)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = index["weight_map"]["scale"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'ghost.weight'") as info:
        open_checkpoint(folder)
    assert info.value.code == "index-key-missing"

    index["weight_map"]["ghost.weight"] = "model-00009-of-00009.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing") as info:
        open_checkpoint(folder)
    assert info.value.code == "missing-shard"


def test_tensor_in_two_shards(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_safetensors({"w": torch.ones(2)}, folder / "a.safetensors")
    save_safetensors({"w": torch.ones(2)}, folder / "b.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "a.safetensors", "x": "b.safetensors"}}))
    with pytest.raises(CheckpointError, match="both a.safetensors and b.safetensors") as info:
        open_checkpoint(folder)
    assert info.value.code == "duplicate-tensor"


def test_invalid_index_json(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON") as info:
        open_checkpoint(tmp_path)
    assert info.value.code == "index-invalid"


def test_folder_without_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="holds no checkpoint") as info:
        open_checkpoint(tmp_path)
    assert info.value.code == "no-checkpoint"


def test_build_header_round_trips(tmp_path):
    header = build_header([("a", "F32", (2,), 8), ("b", "BF16", (), 2)], {"format": "pt"})
    assert (len(header) - 8) % 8 == 0
    path = tmp_path / "x.safetensors"
    path.write_bytes(header + b"\0" * 10)
    checkpoint = open_checkpoint(path)
    assert [(e.name, e.dtype, e.shape) for e in checkpoint] == [("a", "F32", (2,)), ("b", "BF16", ())]


@pytest.mark.parametrize("kind", ["truncated", "evil-pickle", "lfs", "escape", "missing"])
def test_cli_gives_one_line_and_exit_2(tmp_path, kind):
    marker = tmp_path / "pwned"
    if kind == "truncated":
        path = save_safetensors(varied_state_dict(), tmp_path / "model.safetensors")
        path.write_bytes(path.read_bytes()[:-1])
    elif kind == "evil-pickle":
        good = save_bin({"w": torch.ones(2)}, tmp_path / "good.bin")
        path = rewrite_zip(
            good, tmp_path / "evil.bin", replace={"data.pkl": pickle.dumps({"w": _RunShell(f"touch {marker}")}, protocol=2)}
        )
    elif kind == "lfs":
        path = tmp_path / "model.safetensors"
        path.write_text("version https://git-lfs.github.com/spec/v1\n")
    elif kind == "escape":
        path = tmp_path / "model.safetensors.index.json"
        path.write_text(json.dumps({"weight_map": {"w": "../../etc/passwd"}}))
    else:
        path = tmp_path / "nothing-here"
    result = subprocess.run([sys.executable, "-m", "shardkit", "inspect", str(path)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardkit: error: ") and str(path) in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()


def test_zip_directory_pointing_past_any_seekable_offset(tmp_path):
    """A zip64 directory entry whose local-header offset is beyond what seek() takes: the zip's error, not a crash."""
    saved = save_bin({"w": torch.ones(4)}, tmp_path / "good.bin")
    good = rewrite_zip(saved, tmp_path / "plain.bin").read_bytes()  # a plain zip: one directory, no zip64 records
    first, last, end = good.find(b"PK\x01\x02"), good.rfind(b"PK\x01\x02"), good.rfind(b"PK\x05\x06")
    entry = bytearray(good[last:end])
    name_len, extra_len = struct.unpack("<HH", entry[28:32])
    zip64 = struct.pack("<HHQ", 1, 8, 2**63 + 7)  # the header offset, read because the 32-bit field says 0xFFFFFFFF
    entry[30:32] = struct.pack("<H", extra_len + len(zip64))
    entry[42:46] = b"\xff\xff\xff\xff"
    entry[46 + name_len + extra_len : 46 + name_len + extra_len] = zip64
    tail = bytearray(good[end:])
    tail[12:16] = struct.pack("<I", end - first + len(zip64))  # the directory's size
    bad = tmp_path / "pytorch_model.bin"
    bad.write_bytes(good[:last] + bytes(entry) + bytes(tail))
    with pytest.raises(CheckpointError, match="no local header at offset 9223372036854775815") as info:
        open_checkpoint(bad)
    assert info.value.code == "zip-corrupt"
