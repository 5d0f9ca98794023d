"""Grid checkpoints: a run that dies mid-grid resumes to the same numbers; other configs are refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from landscape.engine.grid import EvalSet, PlaneEvaluator, run_grid
from landscape.engine.plane import build_chart, solution_weights
from landscape.engine.store import GridStore
from tests.test_plane_grid import _random_solutions


@pytest.fixture(scope="module")
def evaluator(tiny_entry):
    torch.manual_seed(0)
    model = tiny_entry.build(4)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    chart = build_chart("paper", solution_weights(base, _random_solutions(model)))
    data = tiny_entry.encode([f"text {i} " + "x " * (i % 5) for i in range(12)])
    return PlaneEvaluator(copy.deepcopy(model), chart, EvalSet.prepare(data, torch.arange(12) % 4, 5, "cpu"), "cpu")


XS, YS = np.array([-0.5, 0.0, 0.5, 1.0]), np.array([0.0, 0.5, 1.0])
KEY = {"chart": "paper", "grid": [4, 3]}


class Crash(Exception):
    pass


def test_killed_run_resumes_to_the_same_grid(evaluator, tmp_path, monkeypatch):
    reference = run_grid(evaluator, XS, YS, store=None, progress=False)

    real = evaluator.evaluate
    calls = {"n": 0}

    def dying(x, y):
        calls["n"] += 1
        if calls["n"] > 5:
            raise Crash
        return real(x, y)

    monkeypatch.setattr(evaluator, "evaluate", dying)
    with pytest.raises(Crash):
        run_grid(evaluator, XS, YS, store=GridStore(tmp_path, KEY), progress=False)
    monkeypatch.setattr(evaluator, "evaluate", real)

    store = GridStore(tmp_path, KEY)
    assert len(store.load()) == 5  # the five finished points survived
    resumed = run_grid(evaluator, XS, YS, store=GridStore(tmp_path, KEY), progress=False)
    assert int(resumed["points_computed"]) == 12 - 5
    for k in ("loss", "accuracy", "loss_se"):
        np.testing.assert_array_equal(resumed[k], reference[k])


def test_store_refuses_another_configuration(evaluator, tmp_path):
    run_grid(evaluator, XS[:2], YS[:2], store=GridStore(tmp_path, KEY), progress=False)
    with pytest.raises(ValueError, match="different configuration"):
        GridStore(tmp_path, {**KEY, "grid": [5, 5]}).load()


def test_store_merges_files_of_several_ranks(tmp_path):
    a, b = GridStore(tmp_path, KEY, rank=0), GridStore(tmp_path, KEY, rank=1)
    a.add(0, 0, (1.0, 0.5, 0.1))
    b.add(0, 1, (2.0, 0.25, 0.2))
    assert GridStore(tmp_path, KEY).load() == {(0, 0): (1.0, 0.5, 0.1), (0, 1): (2.0, 0.25, 0.2)}
    # rank 0 rewriting its file keeps what it had
    again = GridStore(tmp_path, KEY, rank=0)
    again.load()
    again.add(1, 1, (3.0, 1.0, 0.0))
    assert len(GridStore(tmp_path, KEY).load()) == 3
