"""Real processes for the kill tests, without paying the imports in each one.

A fresh ``python -m landscape.connectivity`` spends 5-8 s importing torch, transformers and the toolkit
before it computes anything; the fault tests start a dozen such runs only to SIGKILL them. Here each run is
a process forked from one server process (multiprocessing's forkserver) that has imported them once: the
run is still a process of its own, with its own memory, killed by a real SIGKILL, and it computes exactly
as a fresh one (the server only imports: no thread pool, tokenizer or model exists in it before the fork).
The real command line's own start-up is covered by the subprocess tests in test_cli.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import sys
from collections.abc import Sequence
from pathlib import Path

# imported by the server before it forks any run: everything a tiny-bert run imports
PRELOAD = ["adapters", "landscape.connectivity", "transformers.models.bert.modeling_bert", "matplotlib.figure",
           "tests.nodraw", "tests.procs"]  # fmt: skip
_context: dict = {}


def _server():
    if "ctx" not in _context:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _context["ctx"] = ctx
    return _context["ctx"]


def warm() -> None:
    """Start the server now (it returns at once): it imports while other tests run. conftest calls this once
    the tests are collected, when some of them use this module."""
    from multiprocessing import forkserver

    _server()
    forkserver.ensure_running()


def _run(module: str, argv: list[str], log: str, env: dict[str, str], patch: str | None, draw: bool) -> None:
    """The child: the environment, stdout/stderr into ``log``, an optional patch, then ``module.main(argv)``."""
    os.environ.clear()  # the test process's environment when the run was started, as a subprocess would get it
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # tqdm's default lock is a multiprocessing semaphore registered with the test process's resource tracker
    # (shared through the server): one from a SIGKILLed run is reported as leaked when the tests end.
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    if not draw:
        from matplotlib.figure import Figure

        from tests.nodraw import placeholder_savefig

        Figure.savefig = placeholder_savefig
    if patch is not None:  # "package.module:function", called before the run (e.g. to die at a given moment)
        name, _, func = patch.partition(":")
        getattr(importlib.import_module(name), func)()
    sys.exit(importlib.import_module(module).main(argv))


class Run:
    """A started run, with the part of ``subprocess.Popen``'s interface the tests use."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self.process = process
        self.pid = process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def kill(self) -> None:
        """SIGKILL (nothing if it has ended)."""
        if self.process.exitcode is None:
            self.process.kill()

    def wait(self, timeout: float | None = None) -> int | None:
        self.process.join(timeout)
        return self.process.exitcode

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode


def start(
    argv: Sequence[str],
    log: str | os.PathLike,
    env: dict[str, str] | None = None,
    module: str = "landscape.connectivity",
    patch: str | None = None,
    draw: bool = True,
) -> Run:
    """Start ``module.main(argv)`` in a process forked from the preloaded server; its output goes to ``log``.

    ``env``: variables set in the child, over this process's environment (e.g. ``OMP_NUM_THREADS``); ``patch``:
    ``"module:function"`` called in the child first; ``draw=False``: figures built but not drawn in the
    child (:mod:`tests.nodraw`). The exit status is ``main``'s return value, or -9 after SIGKILL (as in
    ``subprocess``)."""
    environ = {**os.environ, **(env or {})}
    proc = _server().Process(target=_run, args=(module, list(argv), str(log), environ, patch, draw))
    proc.start()
    return Run(proc)


def run(argv: Sequence[str], log: str | os.PathLike, timeout: float = 900, **kwargs) -> int | None:
    """:func:`start` and wait for the end; the exit status (None if still running after ``timeout``: killed)."""
    proc = start(argv, log, **kwargs)
    code = proc.wait(timeout)
    if code is None:
        proc.kill()
        proc.wait()
    return code


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process below it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found
