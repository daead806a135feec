"""Mutated files never crash the reader: it returns a table or raises CheckpointError, nothing else."""

from __future__ import annotations

import struct

import pytest
import torch
from builders import save_bin, save_safetensors, tied_state_dict, varied_state_dict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardkit import CheckpointError, load_tensor, open_checkpoint

SETTINGS = settings(
    max_examples=int(__import__("os").environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    folder = tmp_path_factory.mktemp("originals")
    state = {**varied_state_dict(), "tail": tied_state_dict()["model.norm.weight"]}
    st_bytes = save_safetensors(state, folder / "a.safetensors").read_bytes()
    base = torch.arange(24.0).reshape(4, 6)
    bin_bytes = save_bin({**tied_state_dict(), "view": base.t(), "base": base}, folder / "a.bin").read_bytes()
    return {"safetensors": st_bytes, "bin": bin_bytes}


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("length"), st.integers(0, 2**64 - 1), st.just(0)),
)


def mutate(data: bytes, mutations) -> bytes:
    out = bytearray(data)
    for kind, where, value in mutations:
        if not out:
            break
        pos = where % len(out)
        if kind == "flip":
            out[pos] ^= value
        elif kind == "truncate":
            del out[pos:]
        elif kind == "insert":
            out.insert(pos, value)
        else:
            out[:8] = struct.pack("<Q", where)
    return bytes(out)


def read_everything(path) -> None:
    try:
        checkpoint = open_checkpoint(path)
    except CheckpointError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        return
    # Whatever the reader accepted must materialize, or fail with a CheckpointError too.
    for entry in checkpoint:
        try:
            load_tensor(entry)
        except CheckpointError:
            pass


@SETTINGS
@given(mutations=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_safetensors(tmp_path, originals, mutations):
    path = tmp_path / "m.safetensors"
    path.write_bytes(mutate(originals["safetensors"], mutations))
    read_everything(path)


@SETTINGS
@given(mutations=st.lists(mutation.filter(lambda m: m[0] != "length"), min_size=1, max_size=3))
def test_mutated_torch_zip(tmp_path, originals, mutations):
    path = tmp_path / "m.bin"
    path.write_bytes(mutate(originals["bin"], mutations))
    read_everything(path)


@SETTINGS
@given(mutations=st.lists(mutation.filter(lambda m: m[0] != "length"), min_size=1, max_size=4))
def test_mutated_pickle_inside_a_valid_zip(tmp_path, originals, mutations):
    import io
    import zipfile

    source = zipfile.ZipFile(io.BytesIO(originals["bin"]))
    path = tmp_path / "p.bin"
    with zipfile.ZipFile(path, "w") as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = mutate(data, mutations)
            target.writestr(info.filename, data)
    read_everything(path)
