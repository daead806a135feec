"""``validate --against REPO[@REV]`` (size + SHA-256 against the listing's LFS oids) and ``--verify-blobs``."""

from __future__ import annotations

import json

import pytest
from cli_helpers import run_shardkit
from hubwrite import WriteHub
from test_push import REPO, env, folder_files, layout


@pytest.fixture
def hub():
    server = WriteHub()
    server.start()
    yield server
    server.stop()


def validate(hub, tmp_path, *args):
    done = run_shardkit("validate", *args, "--json", env=env(hub, tmp_path))
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


def codes(report) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for finding in report["findings"]:
        out.setdefault(finding["code"], set()).add(finding["file"])
    return out


def test_identical_folder_matches_the_repo_without_downloading(hub, tmp_path):
    local = layout(tmp_path / "local", "35KB")
    hub.seed(REPO, {**folder_files(local), "README.md": b"# hi\n"})
    status, report = validate(hub, tmp_path, local, "--against", REPO)
    assert status == 0 and report["findings"] == [], report
    assert not [line for line in hub.log if "/resolve/" in line]  # listing only, no file downloaded


def test_mismatch_missing_on_either_side_and_revision(hub, tmp_path):
    local = layout(tmp_path / "local", "35KB")
    files = folder_files(local)
    old = hub.seed(REPO, files)
    shard = "model-00002-of-00003.safetensors"
    flipped = bytearray(files[shard])
    flipped[-1] ^= 1
    hub.seed(REPO, {shard: bytes(flipped), "model-00009-of-00009.safetensors": b"x" * 2000})
    (local / "model.fp16.safetensors").write_bytes((local / "model-00001-of-00003.safetensors").read_bytes())
    cut = local / "model-00003-of-00003.safetensors"
    status, report = validate(hub, tmp_path, local, "--against", REPO)
    found = codes(report)
    assert status == 1
    assert found["hub-mismatch"] == {shard}  # same size, other bytes: caught by SHA-256
    assert found["hub-missing"] == {"model.fp16.safetensors"}
    assert found["local-missing"] == {"model-00009-of-00009.safetensors"}

    cut.write_bytes(cut.read_bytes()[:-4])
    _, report = validate(hub, tmp_path, local, "--against", f"{REPO}@{old}")
    found = codes(report)
    assert "hub-mismatch" in found and cut.name in found["hub-mismatch"] and shard not in found["hub-mismatch"]
    assert "sf-truncated" in found  # plain validate's checks still run


def test_against_a_missing_repo_or_revision_is_exit_2(hub, tmp_path):
    local = layout(tmp_path / "local", "35KB")
    hub.seed(REPO, folder_files(local))
    for target in ("user/absent", f"{REPO}@nope"):
        done = run_shardkit("validate", local, "--against", target, env=env(hub, tmp_path))
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_cache_blobs_verified_by_their_own_names_offline(hub, tmp_path):
    import huggingface_hub

    local = layout(tmp_path / "local", "35KB")
    hub.seed(REPO, {**folder_files(local), "config.json": b"{}\n"})
    snapshot = huggingface_hub.snapshot_download(REPO, cache_dir=tmp_path / "cache", endpoint=hub.url, token="hf_write")
    offline = env(hub, tmp_path, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    done = run_shardkit("validate", snapshot, "--verify-blobs", "--json", env=offline)
    assert done.returncode == 0 and json.loads(done.stdout)["findings"] == [], done.stdout + done.stderr

    from pathlib import Path

    blob = Path(snapshot, "model-00001-of-00003.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1  # in the tensor data: the headers stay sound
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    done = run_shardkit("validate", snapshot, "--verify-blobs", "--json", env=offline)
    assert done.returncode == 1
    assert codes(json.loads(done.stdout)) == {"blob-mismatch": {"model-00001-of-00003.safetensors"}}

    plain = run_shardkit("validate", local, "--verify-blobs", env=offline)
    assert plain.returncode == 2 and "not a Hugging Face cache snapshot" in plain.stderr
