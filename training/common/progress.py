"""Progress for people: a live bar on a terminal, a plain line now and then in a file or a pipe.

A tqdm bar redirected to a file writes thousands of carriage-return updates into one line; ``tail``
then shows nothing useful. So bars are drawn only when stderr is a terminal, and the commands
report the same progress as one plain line per epoch or iteration otherwise.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def on_terminal() -> bool:
    """True when stderr is an interactive terminal (where a redrawn bar belongs)."""
    return sys.stderr.isatty()


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0) -> tqdm:
    """A tqdm bar, drawn only when ``enabled`` and stderr is a terminal."""
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not (enabled and on_terminal()))


def log_line(message: str, enabled: bool = True) -> None:
    """One plain progress line on stderr, only where no bar is drawn (a file or a pipe)."""
    if enabled and not on_terminal():
        print(message, file=sys.stderr, flush=True)
