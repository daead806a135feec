"""Progress bars for long work: tqdm on stderr, only when stderr is a terminal, in the units summaries use.

Sizes on bars are decimal (``MB``, ``GB``), as :func:`shardkit.units.format_size` prints them in summaries, not
tqdm's default binary ``M`` meaning MiB. :func:`byte_bar` returns None when no bar should be shown (disabled,
``-q``, ``--json`` or stderr not a terminal), so callers hold ``bar.update if bar else None``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable


def byte_bar(total: int, *, enabled: bool = True, desc: str | None = None):
    """A tqdm bar counting ``total`` bytes, or None when it would not be seen."""
    if not enabled or not _terminal():
        return None
    import shutil

    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        # "1.20MB/3.00MB", as summaries print sizes (tqdm's default shows "1.20M/3.00M")
        bar_format="{l_bar}{bar}| {n_fmt}B/{total_fmt}B [{elapsed}<{remaining}, {rate_fmt}]",
        file=sys.stderr,
        # a terminal that reports no size (0x0, e.g. under `script`) would make tqdm hide the bar: assume 100x24
        ncols=min(120, shutil.get_terminal_size((100, 24)).columns or 100),
        nrows=shutil.get_terminal_size((100, 24)).lines or 24,
        leave=False,
    )


def threadsafe_update(bar) -> Callable[[int], None] | None:
    """``bar.update`` behind a lock, for work reported from several threads (None without a bar)."""
    if bar is None:
        return None
    lock = threading.Lock()

    def update(n: int) -> None:
        with lock:
            bar.update(n)

    return update


def status(message: str, *, enabled: bool = True) -> Callable[[], None]:
    """Show ``message`` on the terminal during a pause (e.g. importing torch); call the result to clear it."""
    if not enabled or not _terminal():
        return lambda: None
    sys.stderr.write(message)
    sys.stderr.flush()

    def clear() -> None:
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()

    return clear


def _terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
