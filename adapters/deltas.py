"""Moved to :mod:`adapters.solutions.deltas`; this name stays for old imports (attributes are forwarded).

``module_deltas`` (the dispatch between this tool's solutions and foreign ones) now lives in
:mod:`adapters.solutions.solution`, above the readers."""

from adapters.solutions import deltas as _deltas
from adapters.solutions.solution import module_deltas  # noqa: F401 (re-exported)


def __getattr__(name: str):
    return getattr(_deltas, name)
