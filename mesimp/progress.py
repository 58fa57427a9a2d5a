"""Progress on stderr: live bars for a person at a terminal, plain lines for a log file.

``progress`` is tri-state everywhere in mesimp: ``True`` draws a live tqdm bar whatever
stderr is, ``False`` draws nothing, and ``None`` (the default) decides from stderr: a
live bar on a terminal, and otherwise no bar at all, so ``make demo > log 2>&1`` writes
no carriage returns. The loops that own a bar print one plain line per unit of work
(an epoch, a bench configuration) where the bar is off in auto mode.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm


def live(progress: bool | None) -> bool:
    """Whether to draw a live bar: the caller's choice, else only when stderr is a TTY."""
    if progress is None:
        isatty = getattr(sys.stderr, "isatty", None)
        return bool(isatty and isatty())
    return bool(progress)


def plain_lines(progress: bool | None) -> bool:
    """Whether to print a plain line per unit of work: auto mode without a terminal."""
    return progress is None and not live(None)


def bar(iterable: Iterable[Any] | None = None, *, progress: bool | None, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr that is drawn only when ``live(progress)``; it disappears
    when done (``leave=False``): the callers log their own summary line."""
    kwargs.setdefault("leave", False)
    return tqdm(iterable, file=sys.stderr, disable=not live(progress), **kwargs)


def line(progress: bool | None, message: str) -> None:
    """Print ``message`` on stderr when plain lines stand in for a bar."""
    if plain_lines(progress):
        print(message, file=sys.stderr, flush=True)
