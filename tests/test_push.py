"""``shardkit push``: one commit that swaps a repo's checkpoint layout, against the write server in hubwrite.py.

huggingface_hub's real client does the HTTP (LFS path); every test downloads the repo back with
huggingface_hub and compares bytes. ``SHARDKIT_HF_PATH=/dir`` puts another huggingface_hub first on the path
of the shardkit child processes (test_push_hf1.py runs this module so with 1.x).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from builders import save_bin, save_sharded
from cli_helpers import ROOT, child_env, run_shardkit
from hubwrite import WriteHub

REPO = "user/model"
README = b"---\nlicense: mit\n---\n# A model\n"
CONFIG = b'{"model_type": "llama"}\n'


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{i}.weight": torch.randn(64, 64, generator=g) for i in range(6)}


def layout(folder: Path, max_shard_size: str, seed: int = 0) -> Path:
    """A checkpoint sharded by huggingface_hub's own writer."""
    save_sharded(state(seed), folder, max_shard_size)
    return folder


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def hub(tmp_path):
    server = WriteHub()
    server.start()
    yield server
    server.stop()


def env(hub: WriteHub, tmp_path: Path, **extra: str) -> dict[str, str]:
    settings = {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    base = child_env(**{**settings, **extra})
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE"):
        base.pop(name, None)
    if os.environ.get("SHARDKIT_HF_PATH"):
        base["PYTHONPATH"] = os.environ["SHARDKIT_HF_PATH"] + os.pathsep + base["PYTHONPATH"]
    return base


def push(hub, tmp_path, *args, token: str | None = "hf_write", **extra):
    options = ["--token", token] if token else []
    return run_shardkit("push", *args, *options, "-q", env=env(hub, tmp_path, **extra))


def download(hub: WriteHub, tmp_path: Path, revision: str = "main", repo_id: str = REPO) -> dict[str, bytes]:
    """The repo as huggingface_hub's snapshot_download (in a child, with the same huggingface_hub) gets it."""
    out = tmp_path / f"download-{len(list(tmp_path.glob('download-*')))}"
    if not os.environ.get("SHARDKIT_HF_PATH"):  # this process's huggingface_hub is the one under test
        import huggingface_hub

        huggingface_hub.snapshot_download(
            repo_id, revision=revision, local_dir=out, cache_dir=tmp_path / "dl-cache", endpoint=hub.url, token="hf_write"
        )
        return {name: data for name, data in folder_files(out).items() if not name.startswith(".cache/")}
    code = (
        "import sys, huggingface_hub as h;"
        f"h.snapshot_download({repo_id!r}, revision={revision!r}, local_dir={str(out)!r}, endpoint={hub.url!r}, token='hf_write')"
    )
    import subprocess

    done = subprocess.run([sys.executable, "-c", code], env=env(hub, tmp_path), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    files = folder_files(out)
    return {name: data for name, data in files.items() if not name.startswith(".cache/")}


@pytest.fixture
def old_repo(hub, tmp_path):
    """A repo holding a 2-shard safetensors checkpoint, its .bin copy, a README and a config."""
    old = layout(tmp_path / "old", "50KB")
    assert len(list(old.glob("*.safetensors"))) == 2
    save_bin(state(), tmp_path / "pytorch_model.bin")
    files = {**folder_files(old), "README.md": README, "config.json": CONFIG}
    files["pytorch_model.bin"] = (tmp_path / "pytorch_model.bin").read_bytes()
    hub.seed(REPO, files)
    return files


def test_push_replaces_the_layout_in_one_commit_and_keeps_other_files(hub, tmp_path, old_repo):
    new = layout(tmp_path / "new", "35KB", seed=1)
    assert len(list(new.glob("*.safetensors"))) == 3
    before = hub.head(REPO)
    done = push(hub, tmp_path, new, REPO, "--commit-message", "Reshard")
    assert done.returncode == 0, done.stderr

    assert len(hub.commits) == 1  # one commit: additions and deletions together
    commit = hub.commits[0]["operations"]
    deleted = {op["value"]["path"] for op in commit if op["key"] == "deletedFile"}
    assert deleted == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert {op["key"] for op in commit} == {"lfsFile", "file", "deletedFile"}
    assert hub.repos[("model", REPO)].commits[hub.head(REPO)].parent == before

    got = download(hub, tmp_path)
    expected = {**folder_files(new), "README.md": README, "config.json": CONFIG}
    expected["pytorch_model.bin"] = old_repo["pytorch_model.bin"]
    assert {k: v for k, v in got.items() if k != ".gitattributes"} == expected
    assert "Reshard" in hub.repos[("model", REPO)].commits[hub.head(REPO)].message


def test_delete_bin_removes_the_bin_checkpoint_a_conversion_replaces(hub, tmp_path, old_repo):
    new = layout(tmp_path / "new", "35KB", seed=1)
    done = push(hub, tmp_path, new, REPO, "--delete-bin")
    assert done.returncode == 0, done.stderr
    got = download(hub, tmp_path)
    assert "pytorch_model.bin" not in got and "README.md" in got and "config.json" in got
    assert len(hub.commits) == 1


def test_single_file_replaced_by_shards_and_other_variants_kept(hub, tmp_path):
    single = tmp_path / "single"
    single.mkdir()
    from safetensors.torch import save_file

    save_file(state(), str(single / "model.safetensors"))
    save_file(state(2), str(single / "model.fp16.safetensors"))
    hub.seed(REPO, folder_files(single))
    new = layout(tmp_path / "new", "35KB", seed=1)
    assert push(hub, tmp_path, new, REPO).returncode == 0
    got = download(hub, tmp_path)
    assert "model.safetensors" not in got  # transformers would pick it before the index
    assert got["model.fp16.safetensors"] == (single / "model.fp16.safetensors").read_bytes()
    assert got["model.safetensors.index.json"] == (new / "model.safetensors.index.json").read_bytes()


def test_unchanged_files_are_not_uploaded_again_and_an_identical_push_makes_no_commit(hub, tmp_path, old_repo):
    new = layout(tmp_path / "new", "35KB", seed=1)
    assert push(hub, tmp_path, new, REPO).returncode == 0
    puts = sum(line.startswith("PUT") for line in hub.log)
    assert puts == 3  # the shards (the index is a regular file)

    again = push(hub, tmp_path, new, REPO)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert len(hub.commits) == 1 and sum(line.startswith("PUT") for line in hub.log) == puts

    shard = new / "model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # same size, different bytes
    shard.write_bytes(bytes(data))
    plan = json.loads(push(hub, tmp_path, new, REPO, "--dry-run", "--json").stdout)
    assert [f["path"] for f in plan["replace"]] == [shard.name]
    assert len(plan["unchanged"]) == 3 and plan["add"] == [] and plan["delete"] == []
    assert push(hub, tmp_path, new, REPO).returncode == 0
    assert sum(line.startswith("PUT") for line in hub.log) == puts + 1
    assert download(hub, tmp_path)[shard.name] == bytes(data)


def test_dry_run_lists_the_plan_and_writes_nothing(hub, tmp_path, old_repo):
    new = layout(tmp_path / "new", "35KB", seed=1)
    before = hub.head(REPO)
    done = push(hub, tmp_path, new, REPO, "--dry-run", "--json", "--delete-bin")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["dry_run"] and plan["commit_url"] is None and plan["commits"] == 1
    assert sorted(f["path"] for f in plan["add"]) == sorted(p.name for p in new.glob("model-*"))
    assert [f["path"] for f in plan["replace"]] == ["model.safetensors.index.json"]
    assert sorted(f["path"] for f in plan["delete"]) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "pytorch_model.bin",
    ]
    assert sorted(plan["keep"]) == [".gitattributes", "README.md", "config.json"]
    sha = hashlib.sha256((new / "model-00001-of-00003.safetensors").read_bytes()).hexdigest()
    assert {f["path"]: f["sha256"] for f in plan["add"]}["model-00001-of-00003.safetensors"] == sha
    assert hub.head(REPO) == before and not hub.commits
    assert not [line for line in hub.log if line.startswith("PUT") or "/preupload/" in line or "/commit/" in line]

    human = push(hub, tmp_path, new, REPO, "--dry-run", token=None)  # a dry run needs no token
    assert human.returncode == 0, human.stderr
    assert "delete    model-00001-of-00002.safetensors" in human.stdout and "nothing was changed" in human.stdout


def test_create_pr_leaves_the_branch_and_opens_refs_pr(hub, tmp_path, old_repo):
    new = layout(tmp_path / "new", "35KB", seed=1)
    before = hub.head(REPO)
    done = push(hub, tmp_path, new, REPO, "--create-pr", "--delete-bin")
    assert done.returncode == 0, done.stderr
    assert "/discussions/1" in done.stdout
    assert hub.head(REPO) == before
    assert hub.commits[0]["create_pr"]
    pr = download(hub, tmp_path, revision="refs/pr/1")
    assert "pytorch_model.bin" not in pr and "model-00001-of-00002.safetensors" not in pr
    assert pr["model-00003-of-00003.safetensors"] == (new / "model-00003-of-00003.safetensors").read_bytes()
    assert "model-00001-of-00002.safetensors" in download(hub, tmp_path)  # main untouched


def test_revision_pushes_to_a_branch(hub, tmp_path, old_repo):
    hub.repos[("model", REPO)].refs["dev"] = hub.head(REPO)
    main = hub.head(REPO)
    new = layout(tmp_path / "new", "35KB", seed=1)
    assert push(hub, tmp_path, new, REPO, "--revision", "dev").returncode == 0
    assert hub.head(REPO) == main and hub.head(REPO, "dev") != main
    assert "model-00003-of-00003.safetensors" in download(hub, tmp_path, revision="dev")


def test_create_makes_a_private_repo(hub, tmp_path):
    new = layout(tmp_path / "new", "35KB")
    done = push(hub, tmp_path, new, "user/fresh", "--create", "--private")
    assert done.returncode == 0, done.stderr
    assert hub.repos[("model", "user/fresh")].private
    assert {k: v for k, v in download(hub, tmp_path, repo_id="user/fresh").items() if k != ".gitattributes"} == folder_files(new)


def test_dataset_repo_type(hub, tmp_path):
    new = layout(tmp_path / "new", "35KB")
    done = push(hub, tmp_path, new, "user/data", "--create", "--repo-type", "dataset")
    assert done.returncode == 0, done.stderr
    assert ("dataset", "user/data") in hub.repos and hub.files("user/data", repo_type="dataset")["model.safetensors.index.json"]


def test_split_push_to(hub, tmp_path, old_repo):
    src = tmp_path / "src"
    src.mkdir()
    save_bin(state(1), src / "pytorch_model.bin")
    out = tmp_path / "out"
    done = run_shardkit(
        "split",
        src,
        out,
        "--max-shard-size",
        "35KB",
        "--push-to",
        REPO,
        "--token",
        "hf_write",
        "--delete-bin",
        "-q",
        env=env(hub, tmp_path),
    )
    assert done.returncode == 0, done.stderr
    got = download(hub, tmp_path)
    assert {k: v for k, v in got.items() if k.startswith("model")} == folder_files(out)
    assert "pytorch_model.bin" not in got and got["README.md"] == README


# -- bad input: one line, a stable code, exit 2, the repo unchanged -------------------------------------------


@pytest.fixture
def in_process(hub, tmp_path, monkeypatch):
    """huggingface_hub in this process pointed at the server (it reads some settings at import)."""
    import huggingface_hub.constants as constants
    from huggingface_hub.utils import _http

    for name, value in env(hub, tmp_path).items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"))

    class NoSleep:  # huggingface_hub backs off 23 s in all before giving up on a dead connection
        def __getattr__(self, name):
            import time

            return (lambda seconds: None) if name == "sleep" else getattr(time, name)

    monkeypatch.setattr(_http, "time", NoSleep())
    return hub


def refused(done, phrase: str) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardkit: error:"), done.stderr
    assert phrase in lines[0], lines[0]
    return lines[0]


def code_of(**kwargs) -> str:
    from shardkit.errors import CATALOGUE, ShardkitError
    from shardkit.hub.publish import push as publish

    with pytest.raises(ShardkitError) as error:
        publish(**kwargs)
    assert error.value.code in CATALOGUE
    return error.value.code


@pytest.mark.parametrize(
    ("token", "code", "phrase"),
    [
        (None, "push-no-token", "no Hub token"),
        ("hf_read", "repo-access-denied", "403"),
        ("hf_nonsense", "repo-access-denied", "401"),
    ],
)
def test_no_token_read_only_or_wrong_token(in_process, tmp_path, old_repo, token, code, phrase):
    hub = in_process
    new = layout(tmp_path / "new", "35KB", seed=1)
    before = hub.head(REPO)
    line = refused(push(hub, tmp_path, new, REPO, token=token), phrase)
    assert "unchanged" in line or token is None
    assert code_of(folder=new, repo_id=REPO, token=token) == code
    assert hub.head(REPO) == before and not hub.commits and not [x for x in hub.log if x.startswith("PUT")]


def test_missing_repo_without_create(in_process, tmp_path):
    hub = in_process
    new = layout(tmp_path / "new", "35KB")
    line = refused(push(hub, tmp_path, new, "user/absent"), "no such model repo")
    assert "--create" in line and ("model", "user/absent") not in hub.repos
    assert code_of(folder=new, repo_id="user/absent", token="hf_write") == "repo-not-found"


def test_missing_revision(in_process, tmp_path, old_repo):
    hub = in_process
    new = layout(tmp_path / "new", "35KB")
    refused(push(hub, tmp_path, new, REPO, "--revision", "nope"), "no branch or revision 'nope'")
    assert code_of(folder=new, repo_id=REPO, token="hf_write", revision="nope") == "revision-not-found"
    assert not hub.commits and "nope" not in hub.repos[("model", REPO)].refs


def test_folder_without_checkpoint(in_process, tmp_path, old_repo):
    hub = in_process
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_bytes(CONFIG)
    refused(push(hub, tmp_path, folder, REPO), "holds no checkpoint")
    assert code_of(folder=folder, repo_id=REPO, token="hf_write") == "no-checkpoint"
    refused(push(hub, tmp_path, tmp_path / "absent", REPO), "no such folder")
    assert code_of(folder=tmp_path / "absent", repo_id=REPO, token="hf_write") == "missing-file"
    assert not hub.commits


def test_invalid_checkpoint_is_refused_unless_forced(in_process, tmp_path, old_repo):
    hub = in_process
    new = layout(tmp_path / "new", "35KB", seed=1)
    shard = new / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])  # a truncated upload candidate
    line = refused(push(hub, tmp_path, new, REPO), "validation found 1 error(s)")
    assert "sf-truncated" in line and "--force" in line and not hub.commits
    assert code_of(folder=new, repo_id=REPO, token="hf_write") == "push-invalid-checkpoint"

    forced = push(hub, tmp_path, new, REPO, "--force")
    assert forced.returncode == 0, forced.stderr
    assert "WARNING: --force" in forced.stderr and "sf-truncated" in forced.stderr
    assert download(hub, tmp_path)[shard.name] == shard.read_bytes()


def test_network_failure_mid_upload_leaves_the_repo_and_a_rerun_resumes(in_process, tmp_path, old_repo):
    """In process, so that huggingface_hub's retry back-off can be skipped."""
    from click.testing import CliRunner

    from shardkit.cli import main

    hub = in_process
    new = layout(tmp_path / "new", "35KB", seed=1)
    before = hub.head(REPO)
    shard_size = (new / "model-00001-of-00003.safetensors").stat().st_size
    hub.fail_put_after = int(shard_size * 1.5)  # one shard arrives, the next is cut off
    args = ["push", str(new), REPO, "--token", "hf_write", "-q"]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 2, done.output
    line = [x for x in done.output.splitlines() if x.startswith("shardkit: error:")]
    assert len(line) == 1 and "upload failed" in line[0] and "unchanged" in line[0] and "rerun" in line[0], done.output
    assert hub.head(REPO) == before and not hub.commits
    assert code_of(folder=new, repo_id=REPO, token="hf_write") == "push-failed"
    arrived = {hashlib.sha256(p.read_bytes()).hexdigest() for p in new.glob("*.safetensors")} & set(hub.objects)
    assert 1 <= len(arrived) < 3

    hub.fail_put_after = None
    puts = sum(x.startswith("PUT") for x in hub.log)
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert sum(x.startswith("PUT") for x in hub.log) - puts == 3 - len(arrived)  # what arrived is not sent again
    assert len(hub.commits) == 1
    got = download(hub, tmp_path)
    assert all(got[p.name] == p.read_bytes() for p in new.iterdir())


def test_multi_commit_only_beyond_a_commits_limits(in_process, tmp_path, old_repo, monkeypatch):
    """Files outside the checkpoint go first, in batches; the last commit swaps the checkpoint."""
    from shardkit.hub import publish

    hub = in_process
    monkeypatch.setattr(publish, "MAX_COMMIT_OPERATIONS", 7)
    new = layout(tmp_path / "new", "35KB", seed=1)
    for i in range(5):
        (new / f"extra-{i}.txt").write_text(f"file {i}\n")
    result = publish.push(new, REPO, token="hf_write")
    assert result.plan.commits == 2 and len(hub.commits) == 2
    first, last = (c["operations"] for c in hub.commits)
    assert all(op["value"]["path"].startswith("extra-") for op in first)
    assert {op["key"] for op in last} == {"lfsFile", "file", "deletedFile"}

    monkeypatch.setattr(publish, "MAX_COMMIT_OPERATIONS", 2)
    with pytest.raises(publish.PushError) as error:
        publish.plan_push(layout(tmp_path / "newer", "35KB", seed=2), REPO, token="hf_write")
    assert error.value.code == "push-too-large"


def test_a_branch_that_moves_during_the_push_is_not_overwritten(in_process, tmp_path, old_repo, monkeypatch):
    """The commit names the head the plan was made against: someone else's commit in between makes it fail."""
    from shardkit.hub import publish

    hub = in_process
    plan_commits = publish.split_commits

    def meanwhile(plan):
        hub.seed(REPO, {"model-00009-of-00009.safetensors": b"\0" * 2000})  # another writer
        return plan_commits(plan)

    monkeypatch.setattr(publish, "split_commits", meanwhile)
    moved = None
    with pytest.raises(publish.PushError) as error:
        moved = hub.head(REPO)
        publish.push(layout(tmp_path / "new", "35KB", seed=1), REPO, token="hf_write")
    assert error.value.code == "push-conflict" and "rerun" in str(error.value)
    assert hub.head(REPO) != moved and not hub.commits  # only the other writer's commit
    assert "model-00009-of-00009.safetensors" in hub.files(REPO)


def test_push_streams_a_large_shard_in_bounded_memory(in_process, tmp_path):
    """Peak RSS of a push of a 256 MiB shard stays far below the shard (hashing: two 8 MiB buffers per thread)."""
    import struct
    import subprocess

    hub = in_process
    folder = tmp_path / "big"
    folder.mkdir()
    size = 256 * 2**20
    header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(folder / "model.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        block = os.urandom(2**20)
        for _ in range(size // 2**20):
            handle.write(block)
    code = (
        "import resource, sys\n"
        "from shardkit.hub.publish import push\n"
        f"push({str(folder)!r}, 'user/big', token='hf_write', create=True)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
    )
    base = (
        "import resource, shardkit.hub.publish, shardkit.validation, huggingface_hub.hf_api\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    )
    runs = [
        subprocess.run([sys.executable, "-c", c], env=env(hub, tmp_path), capture_output=True, text=True, cwd=ROOT)
        for c in (base, code)
    ]
    for done in runs:
        assert done.returncode == 0, done.stderr
    floor, peak = (int(done.stdout.split()[-1]) for done in runs)
    assert hub.files("user/big")["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    print(f"push peak RSS {peak / 2**20:.0f} MiB, imports alone {floor / 2**20:.0f} MiB")
    assert peak - floor < 96 * 2**20, (floor, peak)  # well under the 256 MiB shard
