"""The one exception type that means "the user asked for something we cannot do".

Command-line entry points catch it, print its message as a single line on stderr and
exit with status 2; library callers get an ordinary exception with a helpful message.
A message names the problem and the fix, e.g.
``"WordNet not found under /usr/share/wordnet: install it with 'apt-get install wordnet-base' or pass --data-root"``.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (missing data, unknown name, corrupt file, impossible option)."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type's name when it
    has none: what a one-line :class:`UserError` quotes of a library's error."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
