"""The exceptions shardkit raises.

Every error a user can cause with a bad file or a bad argument is a :class:`ShardkitError`. The CLI turns
it into one line on stderr and exit code 2; a traceback always means a bug in shardkit.
"""

from __future__ import annotations

import os


class ShardkitError(Exception):
    """Base class of every error shardkit raises on purpose.

    ``code`` is a short stable identifier (``"sf-header-too-large"``) that ``shardkit validate`` reports and
    scripts may match on; the message is for people.
    """

    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class CheckpointError(ShardkitError):
    """A checkpoint file, index or folder that cannot be read as what it claims to be."""

    code = "unreadable"

    def __init__(self, path: str | os.PathLike, problem: str, *, code: str | None = None) -> None:
        self.path = os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}", code=code)


class NotACheckpointError(CheckpointError):
    """The file holds something else: a Git LFS pointer, an HTML page, an unknown format."""

    code = "not-a-checkpoint"


class UnsafePickleError(CheckpointError):
    """A pickle asked for a global outside the allow-list; nothing was imported or called."""

    code = "unsafe-pickle"


class UnsafePathError(CheckpointError):
    """An index or symlink points outside the checkpoint's folder."""

    code = "path-escapes-folder"


class UsageError(ShardkitError):
    """A bad argument: an unparsable size, an unknown dtype, a destination that can't be used."""

    code = "usage"


class OutputError(ShardkitError):
    """Writing the output failed (full disk, permissions); nothing was left at the destination."""

    code = "write-failed"


class HubError(ShardkitError):
    """A Hub repo that can't be reached or read at all: missing, gated, no access, no network."""

    code = "hub-error"
