"""Hostile and mutated inputs: validate always returns a report, never crashes, hangs, or believes a size."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import psutil
import pytest
from builders import save_bin, save_safetensors, save_sharded, tied_state_dict, varied_state_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardkit import validate
from shardkit.validation.report import CODES

SHARDS = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]


def _rss_growth(run) -> int:
    """Peak RSS growth (bytes) while ``run()`` executes, sampled every 5 ms."""
    process = psutil.Process()
    base, peak, done = process.memory_info().rss, [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            done.wait(0.005)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        result = run()
    finally:
        done.set()
        thread.join()
    return max(0, peak[0] - base), result


def test_header_length_2_63(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 2**63) + b"{}")
    growth, report = _rss_growth(lambda: validate(tmp_path))
    assert report.codes == {"sf-header-too-large"}
    assert growth < 50 * 2**20


def test_header_length_lies_within_the_limit(tmp_path):
    # 99 MB claimed, 10 bytes present: refused before anything is allocated for it.
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 99_000_000) + b"{}")
    growth, report = _rss_growth(lambda: validate(tmp_path))
    assert report.codes == {"sf-header-past-eof"}
    assert growth < 50 * 2**20


def test_100_mb_header(tmp_path):
    # A header at the reference reader's limit, really present (sparse): read once, refused as not JSON.
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", 100_000_000) + b"{")
        handle.truncate(8 + 100_000_000)
    assert validate(tmp_path).codes == {"sf-header-json"}
    with open(path, "r+b") as handle:
        handle.write(struct.pack("<Q", 100_000_001))
    assert validate(tmp_path).codes == {"sf-header-too-large"}


def test_deeply_nested_json(tmp_path):
    for body in (b"[" * 200_000, b'{"a":' * 100_000):
        (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(body)) + body)
        assert validate(tmp_path).codes == {"sf-header-json"}
    save_sharded(tied_state_dict(), tmp_path / "s", 800) if (tmp_path / "s").mkdir() is None else None
    (tmp_path / "s" / "model.safetensors.index.json").write_bytes(b"[" * 200_000)
    assert validate(tmp_path / "s").codes == {"index-invalid"}


def test_deeply_nested_pickle(tmp_path):
    import zipfile

    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02" + b"]" * 100 + b"(" * 100_000 + b".")
    assert validate(tmp_path).codes == {"pickle-invalid"}


def test_fifo_named_like_a_checkpoint_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    assert validate(tmp_path).codes == {"not-a-file"}


def test_symlink_to_a_device_outside(tmp_path):
    (tmp_path / "model.safetensors").symlink_to("/dev/zero")
    report = validate(tmp_path)
    assert report.codes <= {"path-escapes-folder", "not-a-file"} and not report.ok


def test_index_naming_absolute_and_windows_paths(tmp_path):
    save_sharded(tied_state_dict(), tmp_path, 800)
    path = tmp_path / "model.safetensors.index.json"
    data = json.loads(path.read_text())
    data["weight_map"].update({"a": "/etc/passwd", "b": "C:\\Windows\\x.safetensors", "c": "..\\..\\x.safetensors"})
    path.write_text(json.dumps(data))
    report = validate(tmp_path)
    assert sorted(f.file for f in report.findings if f.code == "path-escapes-folder") == sorted(
        ["/etc/passwd", "C:\\Windows\\x.safetensors", "..\\..\\x.safetensors"]
    )


# --- mutations of valid files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A valid sharded safetensors folder, a .bin file and a single safetensors file, as bytes."""
    root = tmp_path_factory.mktemp("pristine")
    (root / "sharded").mkdir()
    save_sharded(varied_state_dict(), root / "sharded", 300)
    save_bin(tied_state_dict(), root / "pytorch_model.bin")
    save_safetensors(varied_state_dict(), root / "model.safetensors")
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    return files


mutation = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("length"), st.sampled_from([0, 1, 7, 8, 2**32, 2**63, 2**64 - 1, 99_999_999, 100_000_001])),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(
        st.just("index"),
        st.sampled_from(["drop-key", "add-key", "retarget", "total", "float-total", "garbage", "flat", "not-object"]),
    ),
)


def _mutate(data: bytes, how) -> bytes:
    kind, arg = how
    if kind == "truncate":
        return data[: int(len(data) * arg)]
    if kind == "flip":
        buffer = bytearray(data)
        for where, mask in arg:
            if buffer:
                buffer[min(len(buffer) - 1, int(where * len(buffer)))] ^= mask
        return bytes(buffer)
    if kind == "length":
        return struct.pack("<Q", arg) + data[8:]
    if kind == "append":
        return data + arg
    index = json.loads(data)
    names = sorted(index["weight_map"])
    if arg == "drop-key":
        index["weight_map"].pop(names[0])
    elif arg == "add-key":
        index["weight_map"]["ghost"] = SHARDS[0]
    elif arg == "retarget":
        index["weight_map"][names[-1]] = "model-00009-of-00009.safetensors"
    elif arg == "total":
        index["metadata"]["total_size"] = -5
    elif arg == "float-total":
        index["metadata"]["total_size"] = 1e300
    elif arg == "garbage":
        return data[: len(data) // 2]
    elif arg == "flat":
        index = index["weight_map"]
    else:
        index = [index]
    return json.dumps(index).encode()


@settings(
    max_examples=int(os.environ.get("SHARDKIT_FUZZ_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    target=st.sampled_from(
        [
            "sharded/model-00001-of-00004.safetensors",
            "sharded/model.safetensors.index.json",
            "pytorch_model.bin",
            "model.safetensors",
        ]
    ),
    how=mutation,
)
def test_mutations_always_give_a_report(tmp_path_factory, pristine, target, how):
    root = tmp_path_factory.mktemp("mutant")
    for name, content in pristine.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    if how[0] == "index" and not target.endswith(".json"):
        how = ("truncate", 0.5)
    if target.endswith(".json") and how[0] != "index":
        how = ("index", "garbage") if how[0] == "length" else how
    mutated = _mutate(pristine[target], how)
    (root / target).write_bytes(mutated)
    where = root / "sharded" if target.startswith("sharded/") else root / target
    report = validate(where)
    assert all(f.code in CODES and f.severity == CODES[f.code][0] for f in report.findings)
    # Any change of a safetensors file's length or header length breaks its exact-coverage rule.
    if mutated != pristine[target] and how[0] in ("truncate", "append", "length") and target.endswith(".safetensors"):
        assert not report.ok, (how, report.findings)


def test_mutated_files_with_deep_give_a_report(tmp_path, pristine):
    (tmp_path / "model.safetensors").write_bytes(pristine["model.safetensors"][:-3])
    report = validate(tmp_path, deep=True)
    assert report.codes == {"sf-truncated"}
    assert Path(tmp_path / "model.safetensors").exists()
