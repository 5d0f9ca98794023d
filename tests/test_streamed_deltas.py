"""Solution.streamed_deltas(): delta()'s updates one parameter at a time, and its consumers that no longer
hold every dense ΔW at once (the dense model of a solution, curvature's --weight-set plane)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from adapters.deltas import materialise
from adapters.solution import load_solution
from landscape import curvature

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def solutions(tmp_path_factory, tiny_entry):
    from tests.synthetic import save_perturbed_solutions

    out = tmp_path_factory.mktemp("streamed")
    torch.manual_seed(0)
    base = tiny_entry.build(NUM_CLASSES)
    folders = save_perturbed_solutions(base, tiny_entry, out, NUM_CLASSES, 0.2)
    return base, {m: load_solution(folder, base=base) for m, folder in folders.items()}


@pytest.mark.parametrize("method", ["ft", "lora", "randlora"])
def test_streamed_deltas_equal_delta_one_at_a_time(solutions, method):
    """The same names and values as delta() (materialised from peft / safetensors independently); when the
    next ΔW is computed the previous one has been released by the iterator (a weak reference to it is dead)."""
    _, sols = solutions
    solution = sols[method]
    reference = materialise(solution.module_deltas(check=False))
    seen, previous = {}, None
    for name, d in solution.streamed_deltas():
        if previous is not None:
            gc.collect()
            assert previous() is None, "the previous ΔW is still held"
        seen[name] = d.clone()
        previous = weakref.ref(d)
        del d
    assert list(seen) == list(reference)
    for name, d in reference.items():
        torch.testing.assert_close(seen[name], d, rtol=0, atol=0)


def test_plane_weight_set_and_dense_model_from_the_stream(solutions, tiny_entry):
    """--weight-set plane names every parameter some solution changes (the union of delta()'s keys), and
    Solution.model() is W0 + delta() for every parameter."""
    base, sols = solutions
    names = curvature.weight_names(base, tiny_entry.targets, "plane", sols, True)
    changed = set().union(*(materialise(s.module_deltas(check=False)) for s in sols.values()))
    assert set(names) == changed | {n for n, _ in base.named_parameters() if n.startswith("task_head.")}
    lora = sols["lora"]
    model = dict(lora.model().named_parameters())
    delta = materialise(lora.module_deltas(check=False))
    for name, w0 in base.named_parameters():
        expected = w0 + delta[name] if name in delta else w0
        torch.testing.assert_close(model[name], expected, rtol=0, atol=1e-6)
