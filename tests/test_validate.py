"""One test per validate check, each on a checkpoint built broken in exactly that way; the exact code is asserted."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from builders import minilm_dir, save_bin, save_safetensors, save_sharded, tied_state_dict, varied_state_dict

from shardkit import validate
from shardkit.formats.safetensors import build_header
from shardkit.validation.report import CODES

ROOT = Path(__file__).resolve().parents[1]


def write_sf(path, tensors, metadata=None, *, pad=True):
    """A safetensors file from ``(name, dtype, shape, data)``, back to back; ``pad=False`` leaves the header unpadded."""
    header = build_header([(n, d, s, len(b)) for n, d, s, b in tensors], metadata)
    if not pad:
        body = header[8:].rstrip(b" ")
        header = struct.pack("<Q", len(body)) + body
    Path(path).write_bytes(header + b"".join(b for *_, b in tensors))
    return Path(path)


def write_raw(path, header: bytes, data: bytes = b"", length: int | None = None):
    """A file with an arbitrary header (and header length), for breaking the format's rules."""
    Path(path).write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return Path(path)


def f32(*values):
    return struct.pack(f"<{len(values)}f", *values)


@pytest.fixture
def sharded(tmp_path):
    """A sound 3-shard safetensors checkpoint with tied weights (huggingface_hub's writer)."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_sharded(tied_state_dict(), folder, 800)
    return folder


def edit_index(folder, change, name="model.safetensors.index.json"):
    path = folder / name
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def codes(report):
    return sorted(f.code for f in report.findings)


# --- sound checkpoints: no finding, no false positive ---------------------------------------------------------


def test_minilm_is_sound():
    report = validate(minilm_dir())
    assert report.findings == [] and report.verdict == "sound" and report.ok
    assert report.tensors_checked == 104 and report.files_checked == 1


@pytest.mark.parametrize("safe", [True, False])
def test_hub_sharded_checkpoints_are_sound(tmp_path, safe):
    save_sharded(tied_state_dict(), tmp_path, 800, safe=safe)
    report = validate(tmp_path)
    assert report.findings == [], report.findings
    assert report.files_checked == 3


def test_single_files_are_sound(tmp_path):
    save_safetensors(varied_state_dict(), tmp_path / "a.safetensors")
    save_bin(tied_state_dict(), tmp_path / "b.bin")
    assert validate(tmp_path / "a.safetensors").findings == []
    assert validate(tmp_path / "b.bin").findings == []


# --- index -----------------------------------------------------------------------------------------------------


def test_index_invalid(sharded):
    (sharded / "model.safetensors.index.json").write_text("{not json")
    assert codes(validate(sharded)) == ["index-invalid"]


def test_index_without_weight_map_of_strings(sharded):
    edit_index(sharded, lambda d: d.update(weight_map={"a": 3}))
    assert codes(validate(sharded)) == ["index-invalid"]


def test_index_empty(sharded):
    edit_index(sharded, lambda d: d.update(weight_map={}, metadata={"total_size": 0}))
    report = validate(sharded)
    assert "index-empty" in codes(report)
    assert codes(report).count("stale-shard") == 3  # a warning each
    assert not report.ok and "nothing-checked" in codes(report)  # no file read: never sound


def test_index_format_mismatch(tmp_path):
    save_sharded(tied_state_dict(), tmp_path, 800, safe=False)
    (tmp_path / "pytorch_model.bin.index.json").rename(tmp_path / "model.safetensors.index.json")
    report = validate(tmp_path)
    assert codes(report) == ["index-format-mismatch"]


def test_missing_shard(sharded):
    (sharded / "model-00002-of-00003.safetensors").unlink()
    report = validate(sharded)
    assert codes(report) == ["missing-shard", "total-size-unchecked"]
    assert report.findings[0].file == "model-00002-of-00003.safetensors"


def test_index_path_outside_folder(sharded):
    outside = sharded.parent / "outside.safetensors"
    write_sf(outside, [("x", "F32", (1,), f32(1))])
    edit_index(sharded, lambda d: d["weight_map"].update(x="../outside.safetensors"))
    report = validate(sharded)
    assert "path-escapes-folder" in codes(report)


def test_symlinked_shard_outside_folder(sharded):
    shard = sharded / "model-00001-of-00003.safetensors"
    outside = sharded.parent / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    report = validate(sharded)
    assert [f.file for f in report.findings if f.code == "path-escapes-folder"] == ["model-00001-of-00003.safetensors"]


def test_index_key_missing(sharded):
    edit_index(sharded, lambda d: d["weight_map"].update({"ghost.weight": "model-00001-of-00003.safetensors"}))
    report = validate(sharded)
    assert codes(report) == ["index-key-missing"]
    assert report.findings[0].tensor == "ghost.weight"


def test_index_points_to_wrong_shard(sharded):
    edit_index(sharded, lambda d: d["weight_map"].update({"model.norm.weight": "model-00001-of-00003.safetensors"}))
    report = validate(sharded)
    assert codes(report) == ["index-key-missing"]
    assert "model-00003-of-00003.safetensors" in report.findings[0].message


def test_index_key_unlisted(sharded):
    edit_index(sharded, lambda d: d["weight_map"].pop("model.norm.weight"))
    report = validate(sharded)
    assert [(f.code, f.tensor) for f in report.findings] == [("index-key-unlisted", "model.norm.weight")]


def test_duplicate_tensor(tmp_path):
    write_sf(tmp_path / "model-00001-of-00002.safetensors", [("a", "F32", (1,), f32(1)), ("b", "F32", (1,), f32(2))])
    write_sf(tmp_path / "model-00002-of-00002.safetensors", [("b", "F32", (1,), f32(2))])
    index = {
        "metadata": {"total_size": 8},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    report = validate(tmp_path)
    assert codes(report) == ["duplicate-tensor"]
    assert report.findings[0].file == "model-00002-of-00002.safetensors" and report.findings[0].tensor == "b"


def test_total_size_mismatch(sharded):
    edit_index(sharded, lambda d: d["metadata"].update(total_size=d["metadata"]["total_size"] + 1))
    assert codes(validate(sharded)) == ["total-size-mismatch"]


def test_total_size_counts_shared_tensors_once(sharded):
    # tied_state_dict: lm_head.weight is the embedding; huggingface_hub counted it once (2592 bytes).
    assert json.loads((sharded / "model.safetensors.index.json").read_text())["metadata"]["total_size"] == 2592
    edit_index(sharded, lambda d: d["metadata"].update(total_size=2592 + 32 * 8 * 4))
    assert codes(validate(sharded)) == ["total-size-mismatch"]


def test_total_size_missing(sharded):
    edit_index(sharded, lambda d: d["metadata"].pop("total_size"))
    report = validate(sharded)
    assert codes(report) == ["total-size-missing"] and report.ok


@pytest.mark.parametrize("total", [2592.0, 2591.875])  # old transformers sized bools as 1/8 byte
def test_total_size_float(sharded, total):
    edit_index(sharded, lambda d: d["metadata"].update(total_size=total))
    report = validate(sharded)
    assert codes(report) == ["total-size-float"] and report.ok
    assert "the tensors hold 2592 bytes" in report.findings[0].message


# --- files -------------------------------------------------------------------------------------------------------


GOOD = [("a", "F32", (2,), f32(1, 2)), ("b", "F32", (1,), f32(3))]


@pytest.mark.parametrize(
    "code, make",
    [
        ("sf-too-small", lambda p: p.write_bytes(b"\x01\x00")),
        ("sf-header-too-large", lambda p: write_raw(p, b"{}", length=2**63)),
        ("sf-header-past-eof", lambda p: write_raw(p, b"{}", length=90_000_000)),
        ("sf-header-not-utf8", lambda p: write_raw(p, b'{"a\xff": 1}')),
        ("sf-header-json", lambda p: write_raw(p, b'{"a": ')),
        ("sf-header-json", lambda p: write_raw(p, b"[1, 2]")),
        ("sf-bad-metadata", lambda p: write_raw(p, b'{"__metadata__": {"format": 1}}')),
        ("sf-bad-entry", lambda p: write_raw(p, b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}', f32(1))),
        ("sf-unknown-dtype", lambda p: write_raw(p, b'{"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}', f32(1))),
        ("sf-size-mismatch", lambda p: write_raw(p, b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', f32(1))),
        ("sf-offsets", lambda p: write_raw(p, b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', f32(1, 2))),
        (
            "sf-offsets",
            lambda p: write_raw(
                p,
                b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                b'"b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
                f32(1),
            ),
        ),
        ("sf-truncated", lambda p: p.write_bytes(write_sf(p, GOOD).read_bytes()[:-2])),
        ("sf-trailing-bytes", lambda p: p.write_bytes(write_sf(p, GOOD).read_bytes() + b"junk")),
        (
            "lfs-pointer",
            lambda p: p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "a" * 64 + "\nsize 123\n"),
        ),
        ("html-page", lambda p: p.write_text("<!DOCTYPE html><html><body>502 Bad Gateway</body></html>")),
    ],
)
def test_file_rules(tmp_path, code, make):
    path = tmp_path / "model.safetensors"
    make(path)
    report = validate(tmp_path)
    assert codes(report) == [code], report.findings
    assert report.findings[0].file == "model.safetensors"
    assert report.verdict == "broken"


def test_every_rule_a_header_breaks_is_reported(tmp_path):
    header = (
        b'{"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}, '
        b'"b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 8]}, '
        b'"c": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}, '
        b'"__metadata__": {"format": 5}}'
    )
    write_raw(tmp_path / "model.safetensors", header, bytes(16))
    report = validate(tmp_path)
    assert [(f.code, f.file) for f in report.findings] == [
        ("sf-bad-metadata", "model.safetensors"),
        ("sf-unknown-dtype", "model.safetensors"),
        ("sf-size-mismatch", "model.safetensors"),
        ("sf-trailing-bytes", "model.safetensors"),
    ]
    assert "'a'" in report.findings[1].message and "'b'" in report.findings[2].message


def test_every_broken_shard_is_reported(sharded):
    """Validation does not stop at the first problem: each broken file gets its own finding."""
    first, second = sharded / "model-00001-of-00003.safetensors", sharded / "model-00003-of-00003.safetensors"
    first.write_bytes(first.read_bytes()[:-4])
    second.write_text("version https://git-lfs.github.com/spec/v1\n")
    report = validate(sharded)
    assert {(f.code, f.file) for f in report.findings} == {
        ("sf-truncated", "model-00001-of-00003.safetensors"),
        ("lfs-pointer", "model-00003-of-00003.safetensors"),
        ("total-size-unchecked", "model.safetensors.index.json"),
    }


def test_bin_truncated(tmp_path):
    path = save_bin(varied_state_dict(), tmp_path / "pytorch_model.bin")
    path.write_bytes(path.read_bytes()[:-100])
    assert codes(validate(tmp_path)) == ["zip-corrupt"]


def test_bin_unsafe_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"w": torch.zeros(2), "x": Evil()}, tmp_path / "pytorch_model.bin")
    report = validate(tmp_path)
    assert codes(report) == ["unsafe-pickle"]


def test_bin_not_a_torch_file(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x00" * 64)
    assert codes(validate(tmp_path)) == ["unknown-format"]


# --- layout ------------------------------------------------------------------------------------------------------


def test_shard_numbering(sharded):
    for i in (1, 2, 3):
        (sharded / f"model-0000{i}-of-00003.safetensors").rename(sharded / f"model-0000{i}-of-00005.safetensors")
    edit_index(sharded, lambda d: d.update(weight_map={k: v.replace("of-00003", "of-00005") for k, v in d["weight_map"].items()}))
    report = validate(sharded)
    assert codes(report) == ["shard-numbering"]
    assert "say 5 files but the index uses 3" in report.findings[0].message


def test_stale_shard(sharded):
    write_sf(sharded / "model-00004-of-00004.safetensors", GOOD)
    report = validate(sharded)
    assert codes(report) == ["stale-shard"] and report.ok
    assert report.findings[0].file == "model-00004-of-00004.safetensors"


def test_stale_shards_beside_a_single_file(tmp_path):
    save_safetensors(varied_state_dict(), tmp_path / "model.safetensors")
    write_sf(tmp_path / "model-00001-of-00002.safetensors", GOOD)
    assert codes(validate(tmp_path)) == ["stale-shard"]


def test_mixed_formats(tmp_path):
    save_safetensors(varied_state_dict(), tmp_path / "model.safetensors")
    save_bin(varied_state_dict(), tmp_path / "pytorch_model.bin")
    report = validate(tmp_path)
    assert codes(report) == ["mixed-formats"] and report.checkpoint == "model.safetensors"


def _sparse_checkpoint(path, nbytes):
    """A valid safetensors file with one U8 tensor of ``nbytes`` bytes, sparse on disk (no space used)."""
    header = build_header([("big", "U8", (nbytes,), nbytes)], None)
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + nbytes)
    return path


@pytest.mark.parametrize("size, code", [(51 * 10**9, "file-too-large"), (21 * 10**9, "file-large")])
def test_hub_file_size_limits(tmp_path, size, code):
    _sparse_checkpoint(tmp_path / "model.safetensors", size)
    report = validate(tmp_path)
    assert codes(report) == [code]


def test_unaligned_tensor(tmp_path):
    # An unpadded header of odd length puts the F32 data at an odd file offset (some writers do this).
    write_sf(tmp_path / "model.safetensors", [("w", "F32", (2,), f32(1, 2))], {"k": "vvv"}, pad=False)
    assert (8 + struct.unpack("<Q", (tmp_path / "model.safetensors").read_bytes()[:8])[0]) % 4
    report = validate(tmp_path)
    assert codes(report) == ["unaligned-tensor"] and report.findings[0].tensor == "w" and report.ok


# --- targets and outcomes -----------------------------------------------------------------------------------------


def test_index_file_as_target(sharded):
    report = validate(sharded / "model.safetensors.index.json")
    assert report.findings == [] and report.checkpoint == "model.safetensors.index.json"


def test_missing_target_raises(tmp_path):
    from shardkit.errors import CheckpointError

    with pytest.raises(CheckpointError) as info:
        validate(tmp_path / "nope")
    assert info.value.code == "missing-file"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as info:
        validate(tmp_path / "empty")
    assert info.value.code == "no-checkpoint"


def test_every_code_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for code, (severity, meaning) in CODES.items():
        assert f"| `{code}` |" in readme and f"| {severity} |" in readme and meaning in readme, code


def test_report_to_dict(sharded):
    (sharded / "model-00002-of-00003.safetensors").unlink()
    data = validate(sharded).to_dict()
    assert data["verdict"] == "broken" and data["errors"] == 1 and data["bytes_downloaded"] == 0
    assert data["findings"][1]["code"] == "total-size-unchecked"
    assert data["findings"][:1] == [
        {
            "code": "missing-shard",
            "severity": "error",
            "file": "model-00002-of-00003.safetensors",
            "tensor": None,
            "message": data["findings"][0]["message"],
        }
    ]


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "shardkit", "validate", *map(str, args)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_exit_codes_and_output(sharded, tmp_path):
    sound = _cli(sharded)
    assert sound.returncode == 0 and sound.stdout.strip().splitlines()[-1].startswith("SOUND: ")
    (sharded / "model-00002-of-00003.safetensors").unlink()
    write_sf(sharded / "model-00009-of-00009.safetensors", GOOD)
    broken = _cli(sharded)
    assert broken.returncode == 1
    lines = broken.stdout.strip().splitlines()
    assert lines[0] == "errors (1)" and "missing-shard" in lines[1]
    assert lines[3] == "warnings (2)" and {lines[4].split()[0], lines[5].split()[0]} == {"stale-shard", "total-size-unchecked"}
    assert lines[-1].startswith("BROKEN: ") and "1 error, 2 warnings" in lines[-1]
    unreadable = _cli(tmp_path / "nope")
    assert (
        unreadable.returncode == 2
        and unreadable.stderr.startswith("shardkit: error: ")
        and len(unreadable.stderr.splitlines()) == 1
    )


def test_cli_json(sharded):
    edit_index(sharded, lambda d: d["metadata"].pop("total_size"))
    result = _cli(sharded, "--json")
    assert result.returncode == 0
    data = json.loads(result.stdout)
    assert data["verdict"] == "sound-with-warnings" and [f["code"] for f in data["findings"]] == ["total-size-missing"]


def test_header_path_never_imports_torch(sharded):
    save_bin(tied_state_dict(), sharded / "pytorch_model.bin")  # a .bin too: the restricted unpickler, not torch
    code = (
        "import sys; from shardkit import validate; r = validate(sys.argv[1]); "
        "assert r.codes == {'mixed-formats'}, r.findings; "
        "b = validate(sys.argv[1] + '/pytorch_model.bin'); "
        "assert b.ok and (b.tensors_checked, b.aliases_checked) == (6, 1), b.findings; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(sharded)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_zip_bomb_is_refused_unread(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        archive.writestr("archive/data/0", bytes(200 * 1024 * 1024))  # 200 MB of zeros, ~200 kB compressed
    assert path.stat().st_size < 1024 * 1024
    assert codes(validate(tmp_path)) == ["zip-compressed"]
