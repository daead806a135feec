"""The torch zip writer: torch and zipfile read what it writes, zip64 included, without torch on the writing side."""

from __future__ import annotations

import os
import pickletools
import zipfile

import torch

from shardkit.formats import open_file
from shardkit.formats.torchsave import PickledTensor, ZipWriter, state_dict_pickle


def write_archive(path, records: list[tuple[str, bytes]], state: list[tuple[str, PickledTensor]]) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        archive = ZipWriter(fd, "archive")
        archive.add("data.pkl", state_dict_pickle(state))
        archive.add("byteorder", b"little")
        for name, data in records:
            archive.add(name, data)
        archive.add("version", b"3\n")
        os.ftruncate(fd, archive.close())
    finally:
        os.close(fd)


def test_torch_loads_hand_written_pickle_with_sharing(tmp_path):
    a, b = torch.randn(3, 4), torch.arange(5).to(torch.uint16)
    tensors = {"a": PickledTensor("F32", (3, 4), "0", 48), "b": PickledTensor("U16", (5,), "1", 10)}
    state = [("a", tensors["a"]), ("b", tensors["b"]), ("tied", tensors["a"])]
    raw = {"0": a.numpy().tobytes(), "1": b.view(torch.int16).numpy().tobytes()}
    write_archive(tmp_path / "x.bin", [(f"data/{k}", v) for k, v in raw.items()], state)
    loaded = torch.load(tmp_path / "x.bin", weights_only=True)
    assert list(loaded) == ["a", "b", "tied"] and type(loaded).__name__ == "OrderedDict"
    assert torch.equal(loaded["a"], a) and torch.equal(loaded["b"], b) and loaded["tied"] is loaded["a"]
    with zipfile.ZipFile(tmp_path / "x.bin") as archive:
        assert archive.testzip() is None  # every CRC-32 right
        for info in archive.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
    info, entries = open_file(tmp_path / "x.bin")
    assert all(e.offset % 64 == 0 for e in entries)  # torch's 64-byte alignment
    assert {e.name: e.alias_of for e in entries} == {"a": None, "b": None, "tied": "a"}


def test_pickle_uses_only_weights_only_globals_and_big_ints():
    huge = PickledTensor("U8", (2**33,), "0", 2**33)
    data = state_dict_pickle([("x", huge), ("y", PickledTensor("BF16", (2, 3, 4, 5), "1", 240))])
    names = {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    assert names == {"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch ByteStorage", "torch BFloat16Storage"}
    assert 2**33 in {arg for op, arg, _ in pickletools.genops(data) if op.name == "LONG1"}


def test_zip64_offsets_and_sizes(tmp_path):
    """A record past 4 GiB and one larger than 4 GiB (a hole, so the test writes almost nothing)."""
    path = tmp_path / "big.bin"
    big = 2**32 + 4096
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        archive = ZipWriter(fd, "archive")
        archive.add(
            "data.pkl",
            state_dict_pickle(
                [
                    ("big", PickledTensor("U8", (big,), "0", big)),
                    ("tail", PickledTensor("U8", (4,), "1", 4)),
                ]
            ),
        )
        archive.add("byteorder", b"little")
        offset = archive.begin("data/0", big)
        assert offset % 64 == 0
        archive.end(0x12345678)  # not checked here: the data is a hole
        archive.add("data/1", b"tail")
        os.ftruncate(fd, archive.close())
    finally:
        os.close(fd)
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        assert infos["archive/data/0"].file_size == big and infos["archive/data/1"].header_offset > 2**32
        assert zf.read("archive/data/1") == b"tail"  # CRC-checked read past 4 GiB
    _, entries = open_file(path)
    by_name = {e.name: e for e in entries}
    assert by_name["big"].nbytes == big and by_name["big"].offset == offset
    with open(path, "rb") as handle:
        handle.seek(by_name["tail"].offset)
        assert handle.read(4) == b"tail"
