"""Figures built but not drawn, for the tests whose assertions never read a figure.

Drawing a figure (constrained layout, text metrics, rasterising PNG and PDF) is most of the time of a tiny
run of the main job: ~4 of ~6 s on a quiet 2-core machine, more on a busy one. With :func:`placeholder_savefig`
in place of ``matplotlib.figure.Figure.savefig`` every figure is still built (every plotting call of the
toolkit runs) and its file is still written through the atomic writer under its real name, with placeholder
bytes. The figures themselves are tested in test_render, and the whole output contract by test_cli's
end-to-end run, which draws everything.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PLACEHOLDER = b"figure not drawn by this test\n"


def placeholder_savefig(self, fname, *args, **kwargs) -> None:
    """Stands for ``Figure.savefig``: writes :data:`PLACEHOLDER` to ``fname`` (a path)."""
    Path(fname).write_bytes(PLACEHOLDER)


@contextmanager
def figures_not_drawn() -> Iterator[None]:
    """Within: ``Figure.savefig`` is :func:`placeholder_savefig` (for module-scoped fixtures; tests use the
    ``no_figure_drawing`` fixture of conftest)."""
    import pytest
    from matplotlib.figure import Figure

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Figure, "savefig", placeholder_savefig)
        yield


def main(argv: list[str]) -> int:
    """``python -m tests.nodraw MODULE ARG...``: ``MODULE.main([ARG...])`` with figures built but not drawn
    (for torchrun, which starts each worker with ``-m``)."""
    import importlib

    with figures_not_drawn():
        return importlib.import_module(argv[0]).main(argv[1:])


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
