"""Every `$ shardkit ...` command the README shows runs as shown, offline, on stand-in checkpoints.

Placeholders become real paths (``path/to/model``, ``SRC`` a tiny sharded checkpoint; ``ckpt/step-1000`` a DCP
checkpoint; ``DST``/``out``/``./resharded`` fresh folders). Commands that need the Hub (a repo id, ``push``) are
listed as skipped, not silently dropped: the set of skipped commands is asserted too.
"""

from __future__ import annotations

import re
import shlex
import shutil

import pytest
from builders import save_bin, tied_state_dict
from cli_helpers import ROOT, run_shardkit

README = (ROOT / "README.md").read_text()


def console_commands() -> list[str]:
    """The README's `$ shardkit ...` lines, comments removed."""
    commands = []
    for block in re.findall(r"```console\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            if line.startswith("$ shardkit "):
                commands.append(line[2:].split("  #")[0].split(" # ")[0].strip())
    return commands


def needs_the_hub(command: str) -> bool:
    words = shlex.split(command)
    return words[1] == "push" or any(
        re.fullmatch(r"[\w.-]+/[\w.-]+", w) and w.count("/") == 1 and not w.startswith(("ckpt", "path", "./")) for w in words[2:]
    )


#: Options that need a checkpoint of their own kind (FP8 weights, MoE experts): their own tests cover them.
SPECIAL = ("--dequantize", "--experts")


def runnable(command: str) -> bool:
    return not needs_the_hub(command) and not any(option in command.split() for option in SPECIAL)


COMMANDS = console_commands()


def test_the_readme_shows_commands_and_the_hub_ones_are_known():
    assert len(COMMANDS) >= 12
    assert {c for c in COMMANDS if needs_the_hub(c)} == {
        c for c in COMMANDS if " org/" in c or "meta-llama/" in c or c.startswith("shardkit push")
    }


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in COMMANDS if runnable(c)])
def test_readme_command_runs(command, tmp_path, dcp_folders):
    model = tmp_path / "model"
    model.mkdir()
    save_bin(tied_state_dict(), model / "pytorch_model.bin")
    (model / "config.json").write_text("{}")
    ckpt = tmp_path / "ckpt-step-1000"
    shutil.copytree(dcp_folders / "fsdp", ckpt)
    paths = {
        "path/to/model": model,
        "SRC": model,
        "./my-model": model,
        "ckpt/step-1000": ckpt,
        "DST": tmp_path / "dst",
        "out": tmp_path / "out",
        "./resharded": tmp_path / "resharded",
    }
    args = [str(paths.get(word, word)) for word in shlex.split(command)[1:]]
    result = run_shardkit(*args)
    assert result.returncode == 0, (command, result.stdout[-1000:], result.stderr[-1000:])
