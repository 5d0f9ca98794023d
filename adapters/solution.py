"""Moved to :mod:`adapters.solutions.solution`; this name stays for old imports.

The same module object (not a copy), so patching an attribute here patches it for every caller."""

import sys

from adapters.solutions import solution as _solution

sys.modules[__name__] = _solution
