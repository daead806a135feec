"""The ``shardkit`` command: a thin Click shell over the library.

Subcommands live in their own modules and are imported only when invoked, so ``shardkit --help`` stays fast and
commands on the byte path never import torch. Every :class:`~shardkit.errors.ShardkitError` becomes one line on
stderr and exit code 2.

Termination is orderly: SIGTERM and SIGHUP (``kill``, ``timeout``, ``docker stop``, Slurm, a closed terminal) are
handled like Ctrl-C, so half-written output is removed, with exit code 128+signal (143 for SIGTERM, 130 for
Ctrl-C). A reader that goes away (``shardkit inspect X | head``) is not an error: output stops silently and the exit
code is the one the work earned (0, or validate's 1), as if everything had been printed.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

import click

from ..errors import ShardkitError

#: name -> (module, attribute, one-line help). Add a command here and in its own module.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "inspect": ("shardkit.cli.inspect", "inspect_command", "Show what a checkpoint holds: tensors, dtypes, files, aliases."),
    "split": ("shardkit.cli.split", "split_command", "Reshard a checkpoint into Hub-style shards, copying byte ranges."),
    "convert": (
        "shardkit.cli.convert",
        "convert_command",
        "Convert .bin checkpoints to safetensors (or back), keeping the layout.",
    ),
    "validate": ("shardkit.cli.validate", "validate_command", "Check a checkpoint folder or Hub repo; report every problem."),
    "push": (
        "shardkit.cli.push",
        "push_command",
        "Validate a checkpoint folder and publish it to a Hub repo in one commit that replaces the old layout.",
    ),
    "plan": (
        "shardkit.cli.plan",
        "plan_command",
        "Plan a device map (GPUs, CPU, disk) for a checkpoint and show each device's bytes.",
    ),
}


#: Packages only some work needs (materializing tensors, building models) -> how to install them.
_OPTIONAL = {"torch": "'shardkit[torch]'", "safetensors": "'shardkit[torch]'", "transformers": "transformers"}


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so that every ``with``/``finally`` cleans up as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum, frame) -> None:
    signal.signal(signum, signal.SIG_IGN)  # a second signal must not interrupt the cleanup
    raise Terminated(signum)


def handle_termination() -> None:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` (from the main thread; a no-op elsewhere)."""
    if sys.platform == "win32":
        return
    try:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) is signal.SIG_DFL:
                signal.signal(signum, _terminate)
    except ValueError:  # not the main thread (an embedding application): leave its handlers alone
        pass


def stdout_closed() -> None:
    """The reader of stdout went away: send what is left (and Python's final flush) to /dev/null, quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Listing help must not import every command module.
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][2]) for name in sorted(COMMANDS)])

    def invoke(self, ctx: click.Context):
        handle_termination()
        try:
            return super().invoke(ctx)
        except ShardkitError as exc:
            click.echo(f"shardkit: error: {exc}", err=True)
            ctx.exit(2)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except ModuleNotFoundError as exc:
            if exc.name not in _OPTIONAL:
                _internal_error(ctx, exc)
            click.echo(
                f"shardkit: error: this needs {exc.name}, which is not installed: pip install {_OPTIONAL[exc.name]}", err=True
            )
            ctx.exit(2)
        except Terminated as exc:
            click.echo(f"shardkit: terminated ({exc}); nothing was left half-written", err=True)
            ctx.exit(128 + exc.signum)
        except KeyboardInterrupt:
            click.echo("shardkit: interrupted; nothing was left half-written", err=True)
            ctx.exit(130)
        except BrokenPipeError:
            stdout_closed()
            ctx.exit(0)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"shardkit: error: {where}{exc.strerror or exc}", err=True)
            ctx.exit(2)
        except Exception as exc:
            _internal_error(ctx, exc)


#: Exit code of an unexpected exception (a bug), apart from 1 ("validate found errors") and 2 ("can't do that").
EXIT_INTERNAL_ERROR = 3


def _internal_error(ctx: click.Context, exc: BaseException):
    """One line and exit code 3 for an exception shardkit did not expect; ``SHARDKIT_TRACEBACK=1`` shows where."""
    import os
    import traceback

    if os.environ.get("SHARDKIT_TRACEBACK"):
        traceback.print_exception(exc)
    reason = str(exc).splitlines()[0] if str(exc) else ""
    click.echo(
        f"shardkit: internal error: {type(exc).__name__}{': ' + reason if reason else ''} "
        "(a bug in shardkit; please report it, with SHARDKIT_TRACEBACK=1 for the traceback)",
        err=True,
    )
    ctx.exit(EXIT_INTERNAL_ERROR)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="shardkit", prog_name="shardkit")
def main() -> None:
    """Inspect, reshard, convert, validate and load large PyTorch checkpoints.

    The byte path (inspect, split, convert, validate) reads headers and copies byte ranges; it never imports torch.
    """


def hub_options(command):
    """``--revision``, ``--subfolder``, ``--repo-type``, ``--token``: where a Hub repo id's checkpoint is."""
    options = [
        click.option("--revision", help="Hub repo: branch, tag or commit (default main). Local HF cache folder: the snapshot."),
        click.option("--subfolder", help="Hub repo (or folder): the subfolder holding the checkpoint."),
        click.option(
            "--repo-type",
            type=click.Choice(["model", "dataset", "space"]),
            default="model",
            show_default=True,
            help="Hub repo type.",
        ),
        click.option("--token", help="Hub token (default: HF_TOKEN or the token saved by `hf auth login`)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def emit_json(data: object) -> None:
    """Print ``data`` as indented JSON (orjson) on stdout."""
    import orjson

    sys.stdout.buffer.write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS) + b"\n")
    sys.stdout.flush()
