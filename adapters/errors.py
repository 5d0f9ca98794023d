"""The one exception type that means "the user asked for something we cannot do".

Command-line entry points catch it, print its message as a single line on stderr and
exit with status 2; library callers get an ordinary exception with a helpful message.
A message names the problem and the fix, e.g.
``"WordNet not found under /usr/share/wordnet: install it with 'apt-get install wordnet-base' or pass --data-root"``.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (missing data, unknown name, corrupt file, impossible option)."""
