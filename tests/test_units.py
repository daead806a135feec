"""Sizes, dtypes and Hub names: the small pure pieces."""

from __future__ import annotations

import pytest

from shardkit.dtypes import parse_dtype
from shardkit.errors import UsageError
from shardkit.naming import format_of_name, index_file_name, parse_shard_name, shard_file_name, single_file_name
from shardkit.units import format_size, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5GB", 5 * 10**9),
        ("5GiB", 5 * 2**30),
        ("500MB", 500 * 10**6),
        ("123", 123),
        (123, 123),
        ("1.5 gb", 1_500_000_000),
        ("2kib", 2048),
        ("10B", 10),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("5G", "ambiguous"),
        ("five GB", "cannot read"),
        ("5XB", "unknown unit"),
        ("0", "larger than zero"),
        ("-1GB", "cannot read"),
        ("", "cannot read"),
    ],
)
def test_parse_size_rejects_nonsense(text, message):
    with pytest.raises(UsageError, match=message):
        parse_size(text)


def test_format_size():
    assert format_size(999) == "999 B"
    assert format_size(1_350_000_000) == "1.35 GB"


def test_hub_names():
    assert single_file_name() == "model.safetensors"
    assert single_file_name("bin") == "pytorch_model.bin"
    assert single_file_name("safetensors", "fp16") == "model.fp16.safetensors"
    assert shard_file_name(1, 4) == "model-00001-of-00004.safetensors"
    assert shard_file_name(2, 3, "bin") == "pytorch_model-00002-of-00003.bin"
    assert shard_file_name(1, 2, "safetensors", "fp16") == "model.fp16-00001-of-00002.safetensors"
    assert index_file_name() == "model.safetensors.index.json"
    assert index_file_name("bin") == "pytorch_model.bin.index.json"
    assert index_file_name("safetensors", "fp16") == "model.safetensors.index.fp16.json"
    assert parse_shard_name("model-00003-of-00005.safetensors") == ("model", 3, 5, ".safetensors")
    assert parse_shard_name("model.safetensors") is None
    assert format_of_name("model.safetensors.index.fp16.json") == "safetensors"
    assert format_of_name("pytorch_model-00001-of-00002.bin") == "bin"


@pytest.mark.parametrize(
    "text, expected", [("bf16", "BF16"), ("torch.float16", "F16"), ("fp32", "F32"), ("F64", "F64"), ("half", "F16")]
)
def test_parse_dtype(text, expected):
    assert parse_dtype(text) == expected


def test_parse_dtype_rejects():
    with pytest.raises(UsageError, match="unknown dtype 'float7'"):
        parse_dtype("float7")
