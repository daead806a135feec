"""Hub repos end to end, against servers on 127.0.0.1 only: the Range-honouring look-alike in ``hubserver.py``
and olah (a real Hub mirror serving local git repos offline; it ignores Range)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from builders import save_bin, save_safetensors, save_sharded, tied_state_dict, varied_state_dict
from click.testing import CliRunner
from hubserver import HubServer, VirtualFile
from hubserver import isolate as _isolate

import shardkit
from shardkit import validate
from shardkit.cli import main
from shardkit.errors import HubError
from shardkit.formats.safetensors import build_header
from shardkit.hub import remote

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = HubServer()
    _isolate(monkeypatch, tmp_path, server.start())
    yield server
    server.stop()


def _cdn_gets(server: HubServer, name: str) -> int:
    return sum(1 for r in server.requests if r.startswith("GET /cdn/") and r.split(" ")[1].endswith("/" + name))


def _huge_repo(
    server: HubServer, repo_id: str, *, shards: int = 3, shard_bytes: int = 2 * 10**9, header_tensors: int = 4
) -> None:
    """A repo of ``shards`` safetensors shards of ``shard_bytes`` each whose bodies the server makes up lazily."""
    files, weight_map = {}, {}
    per = shard_bytes // header_tensors
    for i in range(1, shards + 1):
        name = f"model-{i:05d}-of-{shards:05d}.safetensors"
        tensors = [(f"layers.{i}.w{j}", "U8", (per,), per) for j in range(header_tensors)]
        header = build_header(tensors, {"format": "pt"})
        files[name] = VirtualFile(header, len(header) + per * header_tensors)
        weight_map.update({t[0]: name for t in tensors})
    index = json.dumps({"metadata": {"total_size": per * header_tensors * shards}, "weight_map": weight_map}).encode()
    files["model.safetensors.index.json"] = VirtualFile(index, len(index))
    files["README.md"] = VirtualFile(b"# big\n", 6)
    from hubserver import Repo

    server.repos[repo_id] = Repo(files=files)


# --- the Range-honouring look-alike --------------------------------------------------------------------------


def test_sound_sharded_repo(hub, tmp_path):
    save_sharded(tied_state_dict(), tmp_path / "repo", 800) if (tmp_path / "repo").mkdir() is None else None
    hub.add_folder("org/tied", tmp_path / "repo")
    report = validate("org/tied")
    assert report.findings == [] and report.files_checked == 3 and (report.tensors_checked, report.aliases_checked) == (6, 1)
    index_size = (tmp_path / "repo" / "model.safetensors.index.json").stat().st_size
    shard_sizes = sum(p.stat().st_size for p in (tmp_path / "repo").glob("*.safetensors"))
    assert report.bytes_downloaded == index_size + shard_sizes  # tiny shards: the first range holds them whole
    for i in (1, 2, 3):
        assert _cdn_gets(hub, f"model-0000{i}-of-00003.safetensors") == 1


def test_multi_gb_repo_downloads_only_kilobytes(hub):
    _huge_repo(hub, "org/huge", shards=3, shard_bytes=2 * 10**9)
    report = validate("org/huge")
    assert report.findings == [] and report.tensors_checked == 12
    # 6 GB of shards: the index and three 100 kB header prefixes, nothing more.
    assert report.bytes_downloaded < 3 * 100_000 + 10_000
    assert hub.sent < 400_000
    assert all(_cdn_gets(hub, f"model-0000{i}-of-00003.safetensors") == 1 for i in (1, 2, 3))


def test_hub_size_limits_from_the_listing(hub):
    _huge_repo(hub, "org/giant", shards=2, shard_bytes=51 * 10**9)
    report = validate("org/giant")
    assert [(f.code, f.file) for f in report.findings] == [
        ("file-too-large", "model-00001-of-00002.safetensors"),
        ("file-too-large", "model-00002-of-00002.safetensors"),
    ]
    assert report.bytes_downloaded < 2 * 100_000 + 10_000


def test_server_that_ignores_range_is_cut_off(hub):
    hub.honour_range = False
    _huge_repo(hub, "org/huge", shards=2, shard_bytes=5 * 10**9)
    report = validate("org/huge")
    assert report.findings == []
    # Whole-file answers are streamed and closed once the header is in: at most a chunk past each prefix.
    assert report.bytes_downloaded < 2 * (100_000 + 64 * 1024) + 10_000


def test_long_header_takes_exactly_two_requests(hub):
    _huge_repo(hub, "org/wide", shards=1, shard_bytes=10**9, header_tensors=3000)
    name = "model-00001-of-00001.safetensors"
    header_length = len(hub.repos["org/wide"].files[name].head)
    assert header_length > 150_000
    report = validate("org/wide")
    assert report.findings == [] and report.tensors_checked == 3000
    assert _cdn_gets(hub, name) == 2
    index = len(hub.repos["org/wide"].files["model.safetensors.index.json"].head)
    assert report.bytes_downloaded == index + header_length


def test_remote_problems_are_all_reported(hub, tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    save_sharded(varied_state_dict(), folder, 300)
    repo = hub.add_folder("org/broken", folder)
    truncated = repo.files["model-00002-of-00004.safetensors"]
    repo.files["model-00002-of-00004.safetensors"] = VirtualFile(truncated.head[:-8], truncated.size - 8)
    grown = repo.files["model-00003-of-00004.safetensors"]
    repo.files["model-00003-of-00004.safetensors"] = VirtualFile(grown.head, grown.size + 100)  # listed larger: junk
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"a" * 64 + b"\nsize 999\n"
    repo.files["model-00004-of-00004.safetensors"] = VirtualFile(pointer, len(pointer))
    repo.files["model-00005-of-00005.safetensors"] = VirtualFile(b"x" * 10, 10)
    report = validate("org/broken")
    assert {(f.code, f.file) for f in report.findings} == {
        ("sf-truncated", "model-00002-of-00004.safetensors"),
        ("sf-trailing-bytes", "model-00003-of-00004.safetensors"),
        ("lfs-pointer", "model-00004-of-00004.safetensors"),
        ("stale-shard", "model-00005-of-00005.safetensors"),
        ("total-size-unchecked", "model.safetensors.index.json"),  # three of four files unread: said, not skipped
    }


def test_remote_missing_shard_and_bin_repo(hub, tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    save_sharded(tied_state_dict(), folder, 800, safe=False)
    repo = hub.add_folder("org/bin", folder)
    assert validate("org/bin").findings == []
    del repo.files["pytorch_model-00002-of-00003.bin"]
    assert validate("org/bin").codes == {"missing-shard", "total-size-unchecked"}


def test_remote_bin_larger_than_the_first_range(hub, tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    save_bin({"a": torch.randn(100_000), "b": torch.randn(50_000), "c": torch.ones(3)}, folder / "pytorch_model.bin")
    hub.add_folder("org/bigbin", folder)
    report = validate("org/bigbin")
    assert report.findings == [] and report.tensors_checked == 3
    assert report.bytes_downloaded < (folder / "pytorch_model.bin").stat().st_size / 2


def test_subfolder_revision_and_variant(hub, tmp_path):
    folder = tmp_path / "repo"
    (folder / "unet").mkdir(parents=True)
    save_safetensors(varied_state_dict(), folder / "unet" / "model.fp16.safetensors")
    save_safetensors(varied_state_dict(), folder / "model.safetensors")
    hub.add_folder("org/pipe", folder)
    report = validate("org/pipe", subfolder="unet", variant="fp16", revision="v1.0")
    assert report.findings == [] and report.checkpoint == "model.fp16.safetensors"
    assert any(r.startswith("GET /api/models/org/pipe/revision/v1.0") for r in hub.requests)
    assert any("/resolve/0123456789abcdef0123456789abcdef01234567/unet/model.fp16.safetensors" in r for r in hub.requests)


def test_dataset_repo(hub, tmp_path):
    (tmp_path / "repo").mkdir()
    save_safetensors(varied_state_dict(), tmp_path / "repo" / "model.safetensors")
    hub.add_folder("org/ds", tmp_path / "repo")
    assert validate("org/ds", repo_type="dataset").findings == []
    assert any(r.startswith("GET /api/datasets/org/ds/revision/main") for r in hub.requests)
    assert any(r.startswith("GET /datasets/org/ds/resolve/") for r in hub.requests)


def test_missing_subfolder(hub, tmp_path):
    (tmp_path / "repo").mkdir()
    save_safetensors(varied_state_dict(), tmp_path / "repo" / "model.safetensors")
    hub.add_folder("org/flat", tmp_path / "repo")
    with pytest.raises(HubError) as info:
        validate("org/flat", subfolder="nope")
    assert info.value.code == "missing-file" and "org/flat/nope" in str(info.value)


def test_missing_repo(hub):
    with pytest.raises(HubError) as info:
        validate("org/nope")
    assert info.value.code == "repo-not-found" and "org/nope" in str(info.value)


def test_gated_repo_needs_a_token(hub, tmp_path):
    (tmp_path / "repo").mkdir()
    save_safetensors(varied_state_dict(), tmp_path / "repo" / "model.safetensors")
    hub.add_folder("org/gated", tmp_path / "repo", gated=True)
    with pytest.raises(HubError) as info:
        validate("org/gated")
    assert info.value.code == "repo-gated" and "token" in str(info.value)
    assert validate("org/gated", token="hf_test").findings == []
    assert any(r.startswith("GET /org/gated/resolve/") for r in hub.requests)


def test_offline_mode(hub, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError) as info:
        validate("org/any")
    assert info.value.code == "hub-offline" and "HF_HUB_OFFLINE" in str(info.value)
    assert hub.requests == []


def test_legacy_torch_file_in_a_repo_is_not_checked_remotely(hub, tmp_path):
    (tmp_path / "repo").mkdir()
    torch.save(
        {"w": torch.ones(3), "z": torch.zeros(2)}, tmp_path / "repo" / "pytorch_model.bin", _use_new_zipfile_serialization=False
    )
    hub.add_folder("org/legacy", tmp_path / "repo")
    report = validate("org/legacy")
    assert report.codes == {"not-checked", "nothing-checked"} and not report.ok  # nothing read: never sound
    deep = validate("org/legacy", deep=True)  # downloaded, then checked (and its data read) locally
    assert {(f.code, f.tensor) for f in deep.findings} == {("all-zero", "z")}


def test_network_failure(monkeypatch, tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _isolate(monkeypatch, tmp_path, f"http://127.0.0.1:{port}")
    with pytest.raises(HubError) as info:
        validate("org/any")
    assert info.value.code == "hub-unreachable" and f"127.0.0.1:{port}" in str(info.value)


def test_cli_on_a_repo(hub, tmp_path):
    _huge_repo(hub, "org/huge", shards=2, shard_bytes=10**9)
    result = CliRunner().invoke(main, ["validate", "org/huge"])
    assert result.exit_code == 0
    assert result.output.strip().splitlines()[-1].startswith("SOUND: org/huge (model.safetensors.index.json)")
    assert "kB downloaded" in result.output
    missing = CliRunner().invoke(main, ["validate", "org/none"])
    assert missing.exit_code == 2 and "repository not found" in missing.output


def test_cli_repo_never_imports_torch(hub):
    _huge_repo(hub, "org/huge", shards=2, shard_bytes=10**9)
    code = (
        "import sys\nfrom shardkit.cli import main\ntry:\n    main(['validate', 'org/huge', '--json'])\n"
        "except SystemExit as exc:\n    print('EXIT', exc.code, 'TORCH', 'torch' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    data, _, tail = out.stdout.rpartition("EXIT")
    assert tail.split() == ["0", "TORCH", "False"], out.stderr
    assert json.loads(data)["verdict"] == "sound"


def test_inspect_a_repo_from_headers(hub):
    _huge_repo(hub, "org/huge", shards=2, shard_bytes=10**9)
    result = CliRunner().invoke(main, ["inspect", "org/huge", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["tensors"] == 8 and summary["bytes"] == 2 * 10**9 and summary["sharded"]
    assert [f["path"] for f in summary["files"]] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert hub.sent < 300_000


def test_download_checkpoint_fetches_only_checkpoint_files(hub, tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    save_sharded(tied_state_dict(), folder, 800)
    save_bin(tied_state_dict(), folder / "pytorch_model.bin")
    (folder / "README.md").write_text("# tied\n")
    (folder / "config.json").write_text("{}")
    hub.add_folder("org/tied", folder)
    local = shardkit.download_checkpoint("org/tied")
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in folder.glob("model*"))
    assert str(local).startswith(str(tmp_path / "hf_home" / "hub"))
    assert validate(local).findings == []
    before = len(hub.requests)
    assert shardkit.download_checkpoint("org/tied") == local  # cached: only metadata requests the second time
    assert not any(r.startswith("GET /cdn/") for r in hub.requests[before:])


def test_deep_on_a_repo_downloads_then_reads_data(hub, tmp_path):
    (tmp_path / "repo").mkdir()
    save_safetensors({"w": torch.tensor([1.0, float("nan")]), "z": torch.zeros(4)}, tmp_path / "repo" / "model.safetensors")
    hub.add_folder("org/nan", tmp_path / "repo")
    report = validate("org/nan", deep=True)
    assert {(f.code, f.tensor) for f in report.findings} == {("nan-values", "w"), ("all-zero", "z")}
    assert report.bytes_downloaded >= (tmp_path / "repo" / "model.safetensors").stat().st_size


def test_model_config_from_the_repo(hub, tmp_path):
    from builders import minilm_dir

    hub.add_folder("org/minilm", minilm_dir())
    report = validate("org/minilm", model_config=True)
    assert report.findings == []


# --- olah: a real Hub mirror, serving local git repos offline -------------------------------------------------


def _lfs_commit(repo: Path, files: dict[str, bytes], lfs: set[str]) -> None:
    """Commit ``files`` to a new git repo; those in ``lfs`` as Git LFS pointers with their objects in .git/lfs."""
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    for name, data in files.items():
        path = repo / name
        if name in lfs:
            oid = hashlib.sha256(data).hexdigest()
            obj = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid
            obj.parent.mkdir(parents=True, exist_ok=True)
            obj.write_bytes(data)
            path.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n")
        else:
            path.write_bytes(data)
    git = ["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "checkpoint"], check=True)


@pytest.fixture(scope="module")
def olah(tmp_path_factory):
    pytest.importorskip("olah")
    root = tmp_path_factory.mktemp("olah")
    source = root / "src"
    source.mkdir()
    save_sharded(tied_state_dict(), source, 800)
    files = {p.name: p.read_bytes() for p in source.iterdir()}
    files["README.md"] = b"# tied\n"
    _lfs_commit(root / "mirrors" / "models" / "org" / "tied", files, lfs={"model-00002-of-00003.safetensors"})
    broken = dict(files)
    broken["model-00001-of-00003.safetensors"] = files["model-00001-of-00003.safetensors"][:-4]
    _lfs_commit(root / "mirrors" / "models" / "org" / "broken", broken, lfs=set())
    big = save_safetensors({"w": torch.randn(500_000)}, root / "big.safetensors").read_bytes()  # 2 MB, in LFS
    _lfs_commit(root / "mirrors" / "models" / "org" / "big", {"model.safetensors": big}, lfs={"model.safetensors"})

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (root / "olah.toml").write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{root / "repos"}"\nmirrors-path = ["{root / "mirrors"}"]\n'
        "[accessibility]\noffline = true\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "olah.server", "-c", str(root / "olah.toml"), "--log-path", str(root / "logs")],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("olah did not start")
        yield endpoint, source
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_olah_sound_repo(olah, monkeypatch, tmp_path):
    endpoint, source = olah
    _isolate(monkeypatch, tmp_path, endpoint)
    report = validate("org/tied")
    assert report.findings == [] and report.files_checked == 3
    # olah ignores Range: the shards are smaller than the first range, so each came whole, once.
    assert report.bytes_downloaded == sum(p.stat().st_size for p in source.iterdir())


def test_olah_ignores_range_and_is_cut_off(olah, monkeypatch, tmp_path):
    endpoint, _ = olah
    _isolate(monkeypatch, tmp_path, endpoint)
    report = validate("org/big")
    assert report.findings == [] and report.tensors_checked == 1
    # olah answers the 100 kB range with the whole 2 MB file; the reader stops after the header's prefix.
    assert 100_000 <= report.bytes_downloaded <= 100_000 + 64 * 1024


def test_olah_broken_repo_and_missing_repo(olah, monkeypatch, tmp_path):
    endpoint, _ = olah
    _isolate(monkeypatch, tmp_path, endpoint)
    report = validate("org/broken")
    assert {(f.code, f.file) for f in report.findings} == {
        ("sf-truncated", "model-00001-of-00003.safetensors"),
        ("total-size-unchecked", "model.safetensors.index.json"),
    }
    with pytest.raises(HubError) as info:
        validate("org/absent")
    assert info.value.code == "repo-not-found"


def test_olah_download_and_inspect(olah, monkeypatch, tmp_path):
    endpoint, source = olah
    _isolate(monkeypatch, tmp_path, endpoint)
    local = shardkit.download_checkpoint("org/tied")
    assert sorted(p.name for p in local.iterdir()) == sorted(p.name for p in source.iterdir())
    for p in source.iterdir():
        assert (local / p.name).read_bytes() == p.read_bytes()
    result = CliRunner().invoke(main, ["inspect", "org/tied", "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["tensors"] == 6


def test_remote_header_rules_match_local(hub, tmp_path):
    """The same broken bytes give the same code locally and through the Hub."""
    body = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}'
    data = struct.pack("<Q", len(body)) + body + b"\0" * 4
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "model.safetensors").write_bytes(data)
    hub.add_folder("org/bad", tmp_path / "repo")
    assert validate("org/bad").codes == validate(tmp_path / "repo").codes == {"sf-size-mismatch"}
    header = (
        b'{"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}, '
        b'"b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 8]}}'
    )
    (tmp_path / "repo" / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    hub.add_folder("org/bad2", tmp_path / "repo")
    remote_findings = [(f.code, f.message) for f in validate("org/bad2").findings]
    assert [c for c, _ in remote_findings] == ["sf-unknown-dtype", "sf-size-mismatch", "sf-truncated"]
    assert remote_findings == [(f.code, f.message) for f in validate(tmp_path / "repo").findings]
    assert remote.PREFIX == 100_000


@pytest.mark.parametrize("command", ["split", "convert"])
def test_split_and_convert_take_a_repo_id(hub, tmp_path, command):
    from safetensors.torch import load_file

    folder = tmp_path / "repo"
    folder.mkdir()
    state = tied_state_dict()
    if command == "split":
        save_sharded(state, folder, 800)
    else:
        save_bin(state, folder / "pytorch_model.bin")
    (folder / "README.md").write_text("# tied\n")
    hub.add_folder("org/src", folder)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        [command, "org/src", str(out), "--quiet", "--revision", "main"]
        + (["--max-shard-size", "400"] if command == "split" else []),
    )
    assert result.exit_code == 0, result.output
    loaded = {}
    for path in sorted(out.glob("*.safetensors")):
        loaded.update(load_file(str(path)))
    assert set(loaded) | {"model.embed_tokens.weight"} == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    assert (out / "README.md").read_text() == "# tied\n"  # the model's other files come along (--weights-only: not)


def test_library_split_takes_a_repo_id(hub, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "repo"
    folder.mkdir()
    state = tied_state_dict()
    save_sharded(state, folder, 800)
    hub.add_folder("org/lib", folder)
    summary = shardkit.split("org/lib", tmp_path / "out", max_shard_size=400, revision="main")
    assert len(summary.files) > 1
    loaded = {k: v for path in sorted((tmp_path / "out").glob("*.safetensors")) for k, v in load_file(str(path)).items()}
    assert loaded and all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_transforms_compose_with_a_repo_source(hub, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "repo"
    folder.mkdir()
    state = {k: v.clone() for k, v in tied_state_dict().items()}
    save_sharded(state, folder, 800)
    (folder / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16", "tie_word_embeddings": False}))
    hub.add_folder("org/cfg", folder)
    out = tmp_path / "out"
    args = ["split", "org/cfg", str(out), "-q", "--dtype", "auto", "--keep-dtype", "*norm*", "--rename", "^model\\.=", "--verify"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    loaded = load_file(str(out / "model.safetensors"))
    assert loaded["layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16 and loaded["norm.weight"].dtype == torch.float32
    assert torch.equal(loaded["lm_head.weight"], state["lm_head.weight"].to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"  # read from the repo's config
    summary = shardkit.split("org/cfg", tmp_path / "lib", dtype="auto", revision="main")  # the library alike
    assert summary.materialized > 0


def test_split_of_a_missing_repo_is_one_line(hub, tmp_path):
    result = CliRunner().invoke(main, ["split", "org/nothing", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "org/nothing" in result.output and "Traceback" not in result.output
