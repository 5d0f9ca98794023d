"""Training without a second copy of the base: adapters train on a skeleton that shares the base's tensors, and
a headless model's head-only stage runs no training pass and evaluates the base in place."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.llm_data import write_commonsense
from tests.llm_models import save_tiny_causal_lm


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from landscape.config import from_argv
    from landscape.run import load

    root = tmp_path_factory.mktemp("shared")
    model = save_tiny_causal_lm(root / "model", "llama")
    data = write_commonsense(root / "data", n_train=16, n_test=4)
    argv = ["--model", f"hf:{model}", "--dataset", "commonsense", "--data-root", str(data), "--out", str(root / "run"),
            "--no-progress", "--train-steps", "2", "--batch-size", "4", "--lora-rank", "2"]  # fmt: skip
    return load(from_argv(argv))


def _train(loaded, method: str, folder: Path) -> None:
    from adapters.train import train_solution
    from landscape.run import method_spec, train_config, train_key

    cpu = torch.device("cpu")
    train_solution(loaded.task, method_spec(loaded, method), train_config(loaded, method, cpu),
                   train_key(loaded, method, cpu), folder, cpu, progress=False)  # fmt: skip


@pytest.mark.parametrize("method", ["lora", "randlora"])
def test_adapters_train_on_the_base_tensors_themselves(loaded, method, tmp_path, monkeypatch):
    """The model handed to the training loop holds the base's very weight tensors (same storage: no copy), the
    base's values and requires_grad flags are as before, and the adapter trained (ΔW ≠ 0)."""
    from adapters import train as train_module
    from adapters.solution import load_solution

    base = loaded.task.base
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    pointers = {p.data_ptr() for p in base.parameters()}
    seen = {}
    real_train = train_module.train

    def spy(model, *args, **kwargs):
        frozen = [p for n, p in model.named_parameters() if not p.requires_grad and "base_layer" in n]
        seen["shared"] = sum(p.data_ptr() in pointers for p in frozen)
        seen["frozen"] = len(frozen)
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(train_module, "train", spy)
    _train(loaded, method, tmp_path / method)
    assert seen["frozen"] > 0 and seen["shared"] == seen["frozen"]
    for n, p in base.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n], n
    delta = load_solution(tmp_path / method, base=base, expect_method=method).delta()
    assert delta and any(d.abs().max() > 0 for d in delta.values())


def test_head_only_of_a_headless_model_runs_no_training(loaded, tmp_path, monkeypatch):
    """A causal LM has no head: its head-only stage calls no training loop and copies no model, and its test
    loss is the base's own (evaluated with the same function)."""
    from adapters import train as train_module

    def refuse(*args, **kwargs):
        raise AssertionError("a training pass ran")

    real_deepcopy = train_module.copy.deepcopy

    def no_model_copy(obj, *args, **kwargs):
        if isinstance(obj, torch.nn.Module):
            raise AssertionError("the model was copied")
        return real_deepcopy(obj, *args, **kwargs)

    monkeypatch.setattr(train_module, "train", refuse)
    monkeypatch.setattr(train_module.copy, "deepcopy", no_model_copy)
    _train(loaded, "head_only", tmp_path / "head_only")
    monkeypatch.undo()
    metrics = json.loads((tmp_path / "head_only" / "metrics.json").read_text())
    info = json.loads((tmp_path / "head_only" / "solution.json").read_text())
    task = loaded.task
    config = loaded.config
    loss, accuracy = train_module.evaluate(task.base, task.test, task.dataset.test.labels, config.eval_batch, "cpu",
                                           "none", task.objective)  # fmt: skip
    assert metrics["steps"] == 0 and info["trainable_params"] == 0
    assert metrics["test_loss"] == pytest.approx(loss, rel=1e-6) and metrics["test_accuracy"] == accuracy
