"""Progress bars that suit where they are written: live bars on a terminal, occasional whole lines in a log.

tqdm redraws its bar with carriage returns several times a second. On a terminal that is one live line;
in a log file or a CI console (stderr not a terminal) every redraw stays, and a long run leaves thousands
of ``\\r`` fragments on one "line". :func:`progress_bar` is tqdm with the same arguments, except that when
its stream is not a terminal it redraws at most every :data:`LOG_INTERVAL_S` seconds and writes each
redraw as its own plain line (no carriage returns, no cursor moves, no clearing of finished bars).
"""

from __future__ import annotations

import re
import sys
from typing import IO, Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0  # seconds between two progress lines in a log
_CONTROL = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\r")  # cursor moves / clears that tqdm writes, and carriage returns


class LineWriter:
    """A text stream that turns tqdm's redraws into whole lines: control sequences dropped, blank redraws
    (tqdm clearing a finished bar) skipped, one line per redraw."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, text: str) -> int:
        for part in _CONTROL.sub("\n", text).split("\n"):
            if part.strip():
                self.stream.write(part.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(*args: Any, **kwargs: Any) -> tqdm:
    """``tqdm(*args, **kwargs)``; when the stream (``file``, default stderr) is not a terminal, a redraw every
    :data:`LOG_INTERVAL_S` seconds at most, each written as one plain line."""
    stream = kwargs.get("file") or sys.stderr
    if not kwargs.get("disable") and not _is_terminal(stream):
        kwargs.update(file=LineWriter(stream), mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S,
                      dynamic_ncols=False, ncols=100, ascii=True, leave=True)  # fmt: skip
    return tqdm(*args, **kwargs)


__all__ = ["LOG_INTERVAL_S", "LineWriter", "progress_bar"]
