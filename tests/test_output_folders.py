"""Output folders as a shell user meets them: mode under the umask, identity kept by --overwrite, an existing empty
folder filled in place, temporary folders of dead runs cleaned up by the next run in the same parent folder."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
from builders import save_bin, tied_state_dict
from cli_helpers import child_env, run_shardkit

import shardkit
from shardkit.write.staging import remove_stale


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)


@pytest.fixture
def source(tmp_path):
    return save_bin(tied_state_dict(), tmp_path / "src.bin")


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_new_destination_gets_mkdirs_mode_under_the_umask(tmp_path, source, umask):
    old = os.umask(umask)
    try:
        shardkit.split(source, tmp_path / "out", max_shard_size=300)
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    files = list(out.iterdir())
    assert len(files) > 2 and all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask for p in files)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another owner needs root")
def test_overwrite_keeps_mode_group_and_owner(tmp_path, source):
    out = tmp_path / "out"
    shardkit.split(source, out, max_shard_size=300)
    os.chown(out, 65534, 65534)
    os.chmod(out, 0o2775)  # a shared drwxrwsr-x folder
    before = out.stat()
    shardkit.split(source, out, max_shard_size=1000, overwrite=True)
    after = out.stat()
    assert (stat.S_IMODE(after.st_mode), after.st_uid, after.st_gid) == (0o2775, 65534, 65534)
    assert after.st_ino != before.st_ino  # swapped whole: old or new checkpoint, never half (README says so)
    assert all(p.stat().st_gid == 65534 for p in out.iterdir())  # the set-gid folder's group, as in the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src.bin"]


def test_overwrite_keeps_a_read_only_mode(tmp_path, source):
    out = tmp_path / "out"
    shardkit.split(source, out)
    os.chmod(out, 0o555)
    try:
        shardkit.split(source, out, max_shard_size=300, overwrite=True)
        assert stat.S_IMODE(out.stat().st_mode) == 0o555
        assert len(list(out.glob("model-*.safetensors"))) > 1
    finally:
        os.chmod(out, 0o755)


def test_empty_current_folder_is_filled_in_place(tmp_path, source):
    """`shardkit split SRC .` in an empty folder: same folder (inode, mode), so the shell's cwd survives."""
    here = tmp_path / "here"
    here.mkdir()
    os.chmod(here, 0o2750)
    before = here.stat()
    result = subprocess.run(
        [sys.executable, "-m", "shardkit", "split", str(source), ".", "--max-shard-size", "300"],
        cwd=here,
        env=child_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    after = here.stat()
    assert (after.st_ino, stat.S_IMODE(after.st_mode)) == (before.st_ino, 0o2750)
    names = sorted(p.name for p in here.iterdir())
    assert "model.safetensors.index.json" in names and not any(n.startswith(".") for n in names)
    assert shardkit.open_checkpoint(here).total_bytes == shardkit.open_checkpoint(source).total_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "src.bin"]


def test_empty_folder_with_overwrite_is_filled_in_place_too(tmp_path, source):
    out = tmp_path / "out"
    out.mkdir()
    inode = out.stat().st_ino
    shardkit.split(source, out, overwrite=True)
    assert out.stat().st_ino == inode and (out / "model.safetensors").is_file()


def test_fill_killed_midway_is_undone_by_the_next_run(tmp_path, source):
    """A run killed while moving files into an empty DST: the next run takes them out again (DST was empty)."""
    out = tmp_path / "out"
    out.mkdir()
    fill = out / f".shardkit-fill-{dead_pid()}-abcd1234"
    fill.mkdir()
    (fill / ".shardkit-moved").write_text("model-00001-of-00002.safetensors\nmodel-00002-of-00002.safetensors\n")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"moved")
    (fill / "model-00002-of-00002.safetensors").write_bytes(b"not yet")
    assert shardkit.write.staging.is_empty(out) is False
    remove_stale(out)
    assert list(out.iterdir()) == []
    # and a run into that folder goes through as into any empty folder
    fill.mkdir()
    shardkit.split(source, out)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]


def test_finished_fill_keeps_its_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    fill = out / f".shardkit-fill-{dead_pid()}-abcd1234"
    fill.mkdir()
    (fill / ".shardkit-moved").write_text("model.safetensors\n")
    (out / "model.safetensors").write_bytes(b"done")
    remove_stale(out)
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]


def test_dead_runs_temporary_folders_anywhere_in_the_parent_are_removed(tmp_path, source):
    dead = dead_pid()
    for name in (f".other.shardkit-tmp-{dead}-1a2b3c4d", f".x.y.shardkit-tmp-{dead}-0f0f0f0f"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 100)
    aside = tmp_path / f".gone.shardkit-old-{dead}-12345678"
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    alive = tmp_path / f".busy.shardkit-tmp-{os.getppid()}-aaaaaaaa"  # a live process's: kept
    alive.mkdir()
    result = run_shardkit("split", source, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    # the set-aside DST of a swap killed between its renames is put back; the rest is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["gone", "out", "src.bin", alive.name])
    assert (tmp_path / "gone" / "config.json").read_text() == "{}"


def test_a_locked_folder_of_another_machine_is_kept(tmp_path):
    """A PID that does not exist here may be a live run on another host of a shared file system: its lock says so."""
    folder = tmp_path / f".out.shardkit-tmp-{dead_pid()}-abcdef12"
    folder.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import fcntl,os,sys; fd=os.open({str(folder)!r}, os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        remove_stale(tmp_path)
        assert folder.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    remove_stale(tmp_path)
    assert not folder.exists()
