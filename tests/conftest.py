"""Shared fixtures: a tiny BERT classifier and tiny datasets written in the real formats."""

from __future__ import annotations

import os

# Before numpy/scipy load OpenBLAS (it reads this once): one BLAS thread. The tests' LAPACK calls are small,
# and with two OpenBLAS threads on a 2-core machine that other work shares, each call's thread hand-offs
# wait for the scheduler: a 200 x 96 numpy SVD took 1.5 s instead of 6 ms. Child processes inherit it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest

# Before torch: `import adapters` puts the OpenMP wait policy in the environment (adapters.threads),
# which torch's OpenMP runtime reads once, when it loads.
import adapters  # noqa: F401

# isort: split
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `auto` precision follows the hardware (adapters.precision): pinned to fp32 so the tests' numbers are the same
# on every machine; tests of bf16 ask for it
os.environ.setdefault("ADAPTERS_NATIVE_BF16", "0")
# Under pytest-xdist (`pytest -n 2`, the README's command) each worker takes one core: one torch thread, and one
# OpenMP thread in the processes its tests start (two workers of two threads each stall in OpenMP's barriers).
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if XDIST_WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(2 if XDIST_WORKERS == 1 else 1)


@pytest.fixture(scope="session")
def tiny_entry():
    from adapters.models import get_model

    return get_model("tiny-bert")


@pytest.fixture(scope="session")
def wordnet_root(tmp_path_factory):
    from tests.fakes import write_wordnet

    folder = tmp_path_factory.mktemp("wordnet")
    write_wordnet(folder, per_category=40)
    return folder


# The main job on tiny-bert and the tiny WordNet: test_cli's end-to-end run, shared (read only) by the tests
# of test_cli, test_curves, test_paths and test_spectrum_extra that need a finished run: one run, not four.
TINY_RUN = ["--model", "tiny-bert", "--train-steps", "3", "--grid", "3", "--eval-samples", "16", "--path-points", "3",
            "--train-per-class", "12", "--test-per-class", "4", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_wordnet_run(tmp_path_factory, wordnet_root):
    """The finished run of :data:`TINY_RUN` (figures drawn: test_cli checks the whole output contract).
    Tests copy what they change; none writes into it."""
    from landscape import connectivity

    out = tmp_path_factory.mktemp("run") / "wordnet"
    assert connectivity.main(["--dataset", "wordnet", "--data-root", str(wordnet_root), "--out", str(out),
                              *TINY_RUN]) == 0  # fmt: skip
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny ops: one torch thread avoids OpenMP barrier stalls when other jobs share the 2 cores (the tests after
    the module get the thread count back)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_figure_drawing():
    """For tests whose assertions never read a figure: matplotlib figures are built but not drawn
    (:mod:`tests.nodraw`), which is most of the time of a tiny run of the main job."""
    from tests.nodraw import figures_not_drawn

    with figures_not_drawn():
        yield


def pytest_collection_finish(session) -> None:
    """When collected tests start runs through tests.procs, its server starts now and imports in the
    background (seconds of imports that would otherwise wait in the first such test)."""
    from tests import procs

    if any(getattr(getattr(item, "module", None), "procs", None) is procs for item in session.items):
        procs.warm()


def free_port() -> str:
    """A TCP port nothing listens on now (for torchrun's rendezvous in tests)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def assert_refused(main, cases, out, capsys) -> None:
    """Each (argv, needle) of ``cases``: ``main(argv + --out out)`` exits 2 with one stderr line that names
    ``needle``, no traceback, and writes nothing at ``out``."""
    for argv, needle in cases:
        capsys.readouterr()
        assert main([*argv, "--out", str(out), "--no-progress"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err and "Traceback" not in err, (argv, err)
    assert not out.exists()


SEEDS_N = 3  # the shared --seeds run's N


def scipy_interval(values) -> list[float]:
    """The reference: scipy's 95 % t-interval of the mean (sem = sd / √N)."""
    import numpy as np
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if stats.sem(x) == 0:  # no spread: the interval is the point (scipy < 1.12 gives nan for a zero scale)
        return [float(x.mean())] * 2
    return list(stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x)))


@pytest.fixture(scope="session")
def seeds_run(tmp_path_factory, wordnet_root):
    """The tiny run of TINY_RUN with --seeds 3 (figures built, not drawn), shared by test_seeds and test_claims:
    read only (tests that rerun or add outputs copy it or write under their own --out)."""
    from landscape import connectivity
    from tests.nodraw import figures_not_drawn

    out = tmp_path_factory.mktemp("seeds") / "wordnet"
    argv = ["--dataset", "wordnet", "--data-root", str(wordnet_root), "--out", str(out), *TINY_RUN, "--seeds",
            str(SEEDS_N)]  # fmt: skip
    with figures_not_drawn():
        assert connectivity.main(argv) == 0
    return out


def reseal(folder) -> None:
    """Record a solution folder's current files in its solution.json (``sha256``), as saving it would have: for tests
    that give a solution other content (a NaN, a missing tensor, an edited update) to check what loading does with
    that content, rather than the refusal of a file changed since the save (test_faults' bit-flip test)."""
    import json
    from pathlib import Path

    from adapters.solution import file_record

    folder = Path(folder)
    info = json.loads((folder / "solution.json").read_text())
    info["sha256"] = file_record(folder)
    (folder / "solution.json").write_text(json.dumps(info, indent=2))
