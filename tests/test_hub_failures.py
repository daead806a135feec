"""The Hub read path when things go wrong (issue 18) and offline (issue 12 item 3), against servers on 127.0.0.1:
subfolders in the cache, servers that hang, die or ignore Range, repos that lie, and no Hub at all."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from builders import save_bin, save_safetensors, save_sharded, tied_state_dict, varied_state_dict
from click.testing import CliRunner
from hubserver import HubServer, Repo, VirtualFile, isolate
from safetensors.torch import load_file

import shardkit
from shardkit import validate
from shardkit.cli import main
from shardkit.errors import CheckpointError, HubError
from shardkit.formats.safetensors import build_header
from shardkit.hub.http import translate

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = HubServer()
    isolate(monkeypatch, tmp_path, server.start())
    for name in ("HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"):  # a short override: failures come fast
        monkeypatch.setenv(name, "1")
        monkeypatch.setattr(huggingface_hub.constants, name, 1)
    yield server
    server.stop()


def _cache(tmp_path: Path, repo_id: str) -> Path:
    return tmp_path / "hf_home" / "hub" / f"models--{repo_id.replace('/', '--')}"


def _pipe(hub: HubServer, tmp_path: Path) -> tuple[Path, dict]:
    """org/pipe: a diffusers-like repo whose text_encoder/ holds a sharded checkpoint with NaN in one tensor."""
    folder = tmp_path / "pipe"
    (folder / "text_encoder").mkdir(parents=True)
    (folder / "unet").mkdir()
    state = varied_state_dict()
    state["w.nan"] = torch.tensor([1.0, float("nan"), 2.0])
    save_sharded(state, folder / "text_encoder", 300)
    save_safetensors({"u": torch.ones(4)}, folder / "unet" / "model.safetensors")
    (folder / "model_index.json").write_text("{}")
    hub.add_folder("org/pipe", folder)
    return folder / "text_encoder", state


def _cdn_gets(hub: HubServer) -> list[str]:
    return [r for r in hub.requests if r.startswith("GET /cdn/")]


# --- 1. subfolders and the cache ----------------------------------------------------------------------------


def test_split_of_a_subfolder_from_the_cache(hub, tmp_path):
    _, state = _pipe(hub, tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["split", "org/pipe", str(out), "--subfolder", "text_encoder", "-q"])
    assert result.exit_code == 0, result.output
    loaded = {}
    for path in out.glob("*.safetensors"):
        loaded.update(load_file(str(path)))
    assert set(loaded) == set(state)
    assert all(_same(loaded[k], state[k]) for k in state)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.view(-1).view(torch.uint8).equal(b.view(-1).view(torch.uint8))


def test_local_validate_and_inspect_of_a_snapshot_subfolder(hub, tmp_path):
    _pipe(hub, tmp_path)
    local = shardkit.download_checkpoint("org/pipe", subfolder="text_encoder")
    assert local == _cache(tmp_path, "org/pipe") / "snapshots" / SHA / "text_encoder"
    assert all(p.is_symlink() for p in local.iterdir())  # ../../../blobs/<hash>: two levels up, not one
    report = validate(local)
    assert report.findings == [] and report.files_checked > 1
    result = CliRunner().invoke(main, ["inspect", str(local), "--json"])
    assert result.exit_code == 0, result.output
    # A link out of the repo's own cache folder is still refused.
    elsewhere = tmp_path / "elsewhere.safetensors"
    elsewhere.write_bytes(local.joinpath("model-00001-of-00004.safetensors").read_bytes())
    target = local / "model-00001-of-00004.safetensors"
    target.unlink()
    target.symlink_to(elsewhere)
    assert "path-escapes-folder" in validate(local).codes


def test_deep_on_a_repo_subfolder_finds_the_nan(hub, tmp_path):
    _pipe(hub, tmp_path)
    report = validate("org/pipe", subfolder="text_encoder", deep=True)
    assert ("nan-values", "w.nan") in {(f.code, f.tensor) for f in report.findings}
    assert report.verdict == "broken" and report.tensors_checked == 11
    result = CliRunner().invoke(main, ["validate", "org/pipe", "--subfolder", "text_encoder", "--deep"])
    assert result.exit_code == 1 and "nan-values" in result.output and "SOUND" not in result.output


def test_checksums_of_a_repo_subfolder_are_the_real_manifest(hub, tmp_path):
    _, state = _pipe(hub, tmp_path)
    manifest = tmp_path / "sums.json"
    report = validate("org/pipe", subfolder="text_encoder", checksums=manifest)
    assert report.checksums_written == str(manifest)
    assert set(json.loads(manifest.read_text())["tensors"]) == set(state)
    assert validate("org/pipe", subfolder="text_encoder", checksums=manifest).checksums_matched == len(state)


def test_a_check_over_nothing_is_an_error(tmp_path):
    empty = tmp_path / "model.safetensors"
    save_safetensors({}, empty)
    manifest = tmp_path / "sums.json"
    report = validate(empty, deep=True, checksums=manifest)
    assert report.codes == {"nothing-checked"} and report.verdict == "broken"
    assert not manifest.exists()  # no manifest written from nothing


# --- 2. timeouts: never a hang --------------------------------------------------------------------------------


def test_a_server_that_never_answers_gives_hub_unreachable(hub):
    hub.hang = "all"
    started = time.monotonic()
    with pytest.raises(HubError) as info:
        validate("org/any")
    assert info.value.code == "hub-unreachable"
    assert "no such local path; and the Hub" in str(info.value)
    assert time.monotonic() - started < 10


def test_a_server_that_stops_sending_files_gives_hub_unreachable(hub, tmp_path):
    (tmp_path / "repo").mkdir()
    save_safetensors(varied_state_dict(), tmp_path / "repo" / "model.safetensors")
    hub.add_folder("org/slow", tmp_path / "repo")
    hub.hang = "cdn"
    started = time.monotonic()
    result = CliRunner().invoke(main, ["validate", "org/slow"])
    assert result.exit_code == 2 and "hub-unreachable" not in result.output  # one line, the message
    assert "cannot reach" in result.output
    assert time.monotonic() - started < 15


# --- 3. true codes ------------------------------------------------------------------------------------------


def test_connection_lost_during_a_download_is_hub_unreachable(hub, tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    save_sharded(tied_state_dict(), folder, 300)
    hub.add_folder("org/dies", folder)
    hub.die_after = 2  # the index and one shard, then gone
    started = time.monotonic()
    with pytest.raises(HubError) as info:
        shardkit.download_checkpoint("org/dies")
    assert info.value.code == "hub-unreachable", info.value
    assert time.monotonic() - started < 15
    result = CliRunner().invoke(main, ["split", "org/dies", str(tmp_path / "out")])
    assert result.exit_code == 2 and "cannot reach" in result.output and "no such file" not in result.output


def test_translate_looks_at_the_cause_first():
    import httpx
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        try:
            raise httpx.ConnectError("connection reset")
        except httpx.ConnectError as exc:
            raise LocalEntryNotFoundError("cannot find the requested files in the local cache") from exc
    except LocalEntryNotFoundError as wrapped:
        error = translate(wrapped, what="org/x: model.safetensors", repo="org/x")
    assert error.code == "hub-unreachable"


def test_a_shard_missing_from_the_repo_fails_before_any_download(hub, tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    save_sharded(tied_state_dict(), folder, 300)
    repo = hub.add_folder("org/gap", folder)
    gone = sorted(p.name for p in folder.glob("model-*.safetensors"))[1]
    del repo.files[gone]
    with pytest.raises(CheckpointError) as info:
        shardkit.download_checkpoint("org/gap")
    assert info.value.code == "missing-shard" and gone in str(info.value)
    assert not any("model-0000" in r for r in _cdn_gets(hub))  # only the index was fetched


def test_an_unexpected_exception_exits_3(monkeypatch, tmp_path):
    save_safetensors({"w": torch.ones(2)}, tmp_path / "model.safetensors")

    def boom(*args, **kwargs):
        raise RuntimeError("a bug\nsecond line")

    monkeypatch.setattr("shardkit.cli.inspect.summarize", boom)
    result = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 3
    assert result.output.strip().splitlines() == [
        "shardkit: internal error: RuntimeError: a bug (a bug in shardkit; please report it, with SHARDKIT_TRACEBACK=1 "
        "for the traceback)"
    ]


# --- 4. every problem ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("declared, code", [(10, "total-size-mismatch"), (10**9, "total-size-unchecked")])
def test_total_size_is_checked_over_the_files_that_opened(hub, tmp_path, declared, code):
    folder = tmp_path / "repo"
    folder.mkdir()
    save_sharded(varied_state_dict(), folder, 300)
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["metadata"]["total_size"] = declared
    index.write_text(json.dumps(data))
    shard = folder / "model-00002-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    hub.add_folder("org/lies", folder)
    for report in (validate(folder), validate("org/lies")):
        assert {f.code for f in report.findings} == {"sf-truncated", code}


# --- 5. dry runs download nothing ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["split", "convert"])
def test_dry_run_on_a_repo_downloads_nothing(hub, tmp_path, command):
    folder = tmp_path / "repo"
    folder.mkdir()
    save_sharded(tied_state_dict(), folder, 300, safe=command == "split")
    hub.add_folder("org/src", folder)
    result = CliRunner().invoke(main, [command, "org/src", str(tmp_path / "out"), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["dry_run"] is True
    assert not (tmp_path / "out").exists()
    assert not _cache(tmp_path, "org/src").exists()  # nothing in the cache either
    assert not any(r.startswith("HEAD ") for r in hub.requests)  # no hf_hub_download
    summary = getattr(shardkit, command)("org/src", tmp_path / "lib-out", dry_run=True)  # the library too
    assert summary.dry_run and summary.files and not _cache(tmp_path, "org/src").exists()


# --- 6. servers that ignore Range ---------------------------------------------------------------------------


def _bin_repo(hub: HubServer, tmp_path: Path, records: int = 300, numel: int = 4096) -> Path:
    folder = tmp_path / "binrepo"
    folder.mkdir()
    state = {f"layer.{i}.weight": torch.randn(numel) for i in range(records)}  # 300 x 16 kB: ~5 MB
    save_bin(state, folder / "pytorch_model.bin")
    hub.add_folder("org/bin", folder)
    return folder / "pytorch_model.bin"


def test_bin_on_a_server_that_ignores_range_goes_over_the_wire_once(hub, tmp_path):
    path = _bin_repo(hub, tmp_path)
    size = path.stat().st_size
    hub.honour_range = False
    report = validate("org/bin")
    assert report.findings == [] and report.tensors_checked == 300
    assert report.server_ignored_range and report.to_dict()["server_ignored_range"]
    assert report.bytes_downloaded == size  # the first answer is the whole file: read on, never asked again
    assert len(_cdn_gets(hub)) == 1
    assert hub.sent <= size + 256 * 1024
    assert "the server ignored Range" in CliRunner().invoke(main, ["validate", "org/bin"]).output


def test_bin_of_many_records_is_streamed_after_a_few_ranges(hub, tmp_path):
    from shardkit.hub.remote import RangeFile

    path = _bin_repo(hub, tmp_path)  # 300 records: 300 round trips by ranges
    report = validate("org/bin")
    assert report.findings == [] and report.tensors_checked == 300 and not report.server_ignored_range
    assert len(_cdn_gets(hub)) <= RangeFile.MAX_REQUESTS + 2  # a few ranges, then the rest in one request
    # About one file's size: the first ranges (the 100 kB prefix, a few 16 kB blocks) plus the rest once.
    assert report.bytes_downloaded <= path.stat().st_size + 100_000 + RangeFile.MAX_REQUESTS * RangeFile.BLOCK


def test_a_large_bin_stays_on_ranges(hub, tmp_path, monkeypatch):
    from shardkit.hub.remote import RangeFile

    monkeypatch.setattr(RangeFile, "STREAM_LIMIT", 1 << 20)  # as a multi-GB file: only its last MiB is streamed
    path = _bin_repo(hub, tmp_path, records=20, numel=65536)  # 256 kB records: one 16 kB range each
    report = validate("org/bin")
    assert report.findings == [] and report.tensors_checked == 20
    assert report.bytes_downloaded < (1 << 20) + 20 * RangeFile.BLOCK + 100_000 < path.stat().st_size / 2


def test_long_header_on_a_server_that_ignores_range_takes_one_request(hub):
    name = "model.safetensors"
    tensors = [(f"t{i}", "U8", (1000,), 1000) for i in range(3000)]
    header = build_header(tensors, {"format": "pt"})
    assert len(header) > 150_000
    hub.repos["org/wide"] = Repo(files={name: VirtualFile(header, len(header) + 3000 * 1000)})
    hub.honour_range = False
    report = validate("org/wide")
    assert report.findings == [] and report.tensors_checked == 3000
    assert len(_cdn_gets(hub)) == 1 and report.bytes_downloaded < len(header) + 2 * 64 * 1024


# --- 7. a cache that split filled validates by its cache folder ---------------------------------------------


def test_cache_filled_by_split_validates_by_its_folder(hub, tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    save_sharded(tied_state_dict(), folder, 300)
    hub.add_folder("org/src", folder)
    result = CliRunner().invoke(main, ["split", "org/src", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    cache = _cache(tmp_path, "org/src")
    assert (cache / "refs" / "main").read_text() == SHA  # written as huggingface_hub does
    assert validate(cache).findings == []
    (cache / "refs" / "main").unlink()  # a cache filled without refs: its one snapshot is used
    assert validate(cache).findings == []


# --- 9. offline and the local cache (issue 12 item 3) -------------------------------------------------------


@pytest.fixture
def cached_repo(hub, tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    save_sharded(tied_state_dict(), folder, 300)
    hub.add_folder("org/cached", folder)
    shardkit.download_checkpoint("org/cached")
    return folder


@pytest.mark.parametrize("how", ["offline", "unreachable"])
def test_a_cached_repo_resolves_without_the_hub(hub, tmp_path, monkeypatch, cached_repo, how):
    if how == "offline":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:
        hub.hang = "all"  # answers nothing: every call times out
    before = len(hub.requests)
    report = validate("org/cached")
    assert report.findings == [] and report.from_cache == str(_cache(tmp_path, "org/cached") / "snapshots" / SHA)
    result = CliRunner().invoke(main, ["validate", "org/cached"])
    assert result.exit_code == 0 and f"read from the local cache {report.from_cache}" in result.output
    assert shardkit.download_checkpoint("org/cached") == Path(report.from_cache)
    result = CliRunner().invoke(main, ["inspect", "org/cached", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["tensors"] == 6, result.output
    for command in ("split", "convert"):
        out = tmp_path / f"out-{command}-{how}"
        result = CliRunner().invoke(main, [command, "org/cached", str(out), "-q"])
        assert result.exit_code == 0, result.output
        assert any(out.glob("*.safetensors"))
    if how == "offline":
        assert len(hub.requests) == before  # not one request


def test_a_repo_id_neither_local_nor_reachable_says_both(hub, monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for command in (["validate", "org/nowhere"], ["inspect", "org/nowhere"], ["split", "org/nowhere", str(tmp_path / "o")]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2, result.output
        assert "org/nowhere: no such local path; and the Hub: " in result.output
        assert "HF_HUB_OFFLINE" in result.output and "cache" in result.output
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    result = CliRunner().invoke(main, ["validate", "org/nowhere"])
    assert result.exit_code == 2 and "no such local path; and the Hub: repository not found" in result.output


def test_timeouts_come_from_the_huggingface_hub_settings(monkeypatch):
    from shardkit.hub import http

    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2.5")
    monkeypatch.delenv("HF_HUB_DOWNLOAD_TIMEOUT", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DOWNLOAD_TIMEOUT", 7)
    assert http.metadata_timeout() == 2.5 and http.download_timeout() == 7
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "junk")
    assert http.download_timeout() == 7
    assert os.environ["HF_HUB_ETAG_TIMEOUT"] == "2.5"
