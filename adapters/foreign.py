"""Moved to :mod:`adapters.solutions.foreign`; this name stays for old imports (attributes are forwarded).

``load`` (a foreign path as a Solution) is :func:`adapters.solutions.solution.load_foreign`: the readers sit
below the Solution type."""

from adapters.solutions import foreign as _foreign
from adapters.solutions.solution import load_foreign as load  # noqa: F401 (re-exported)


def __getattr__(name: str):
    return getattr(_foreign, name)
