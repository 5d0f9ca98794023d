"""Half precision is honest: training, the rounding floor of spectra, the fp32 re-evaluation.

Each test checks against a reference independent of the code under test:

- full fine-tuning of a tiny Llama stored in bf16 (and fp16, with loss scaling) at lr 1e-5 moves the weights
  and lowers the loss as much as the same run stored in fp32 (within 10 %): ΔW and the losses are measured
  here on fp32 copies, not by the toolkit;
- a step the fp16 loss scaler skips (inf gradient) leaves the weights and the learning-rate schedule alone;
- the rounding floor of a spectrum equals the top singular value (numpy's SVD) of the actual rounding noise of
  a random matrix cast to bf16 and back; a planted low-rank ΔW above it is counted, its tail below is marked;
- the "fp32" re-evaluation of a bf16-stored model equals evaluating an explicitly fp32-cast copy.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.llm_data import write_commonsense
from tests.llm_models import save_tiny_causal_lm

STEPS, LR = 30, 1e-5


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("llama") / "model", "llama")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_commonsense(tmp_path_factory.mktemp("commonsense"), n_train=8, n_test=2)


def _loaded(llama: Path, data_root: Path, out: Path, dtype: str):
    from landscape.config import from_argv
    from landscape.run import load

    argv = ["--model", f"hf:{llama}", "--dataset", "commonsense", "--data-root", str(data_root), "--out", str(out),
            "--no-progress", "--device", "cpu", "--torch-dtype", dtype, "--methods", "ft"]  # fmt: skip
    return load(from_argv(argv))


def _fp32_loss(model: torch.nn.Module, loaded) -> float:
    """The mean training loss of an fp32 copy of ``model``: the same yardstick for every storage dtype."""
    from adapters.train import evaluate

    task = loaded.task
    copy32 = copy.deepcopy(model).float()
    return evaluate(copy32, task.train, task.dataset.train.labels, 64, "cpu", "none", task.objective)[0]


def _ft_run(llama: Path, data_root: Path, out: Path, dtype: str) -> dict:
    """FT through the toolkit (its own train config, lr 1e-5, 30 steps): ΔW norm and loss decrease, in fp32."""
    from adapters.methods import attach
    from adapters.train import train
    from landscape.run import method_spec, train_config

    loaded = _loaded(llama, data_root, out, dtype)
    base = loaded.task.base
    config = dataclasses.replace(train_config(loaded, "ft", torch.device("cpu")), lr=LR, steps=STEPS, batch_size=4)
    model = attach(copy.deepcopy(base), method_spec(loaded, "ft"), loaded.task.entry.targets)
    history = train(model, loaded.task.train, loaded.task.dataset.train.labels, config, progress=False,
                    objective=loaded.task.objective)  # fmt: skip
    w0 = dict(base.named_parameters())
    delta = torch.cat([(p.detach().float() - w0[n].detach().float()).flatten() for n, p in model.named_parameters()])
    return {
        "delta_norm": float(delta.norm()),
        "decrease": _fp32_loss(base, loaded) - _fp32_loss(model, loaded),
        "losses": history["train_loss"],
        "model": model,
    }


@pytest.fixture(scope="module")
def fp32_run(llama, data_root, tmp_path_factory) -> dict:
    return _ft_run(llama, data_root, tmp_path_factory.mktemp("fp32"), "float32")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_storage_ft_moves_like_fp32(llama, data_root, tmp_path, fp32_run, dtype):
    half = _ft_run(llama, data_root, tmp_path, dtype)
    ratio_norm = half["delta_norm"] / fp32_run["delta_norm"]
    ratio_loss = half["decrease"] / fp32_run["decrease"]
    print(f"{dtype}: ΔW norm {half['delta_norm']:.5f} vs fp32 {fp32_run['delta_norm']:.5f} (ratio {ratio_norm:.3f}); "
          f"loss decrease {half['decrease']:.5f} vs {fp32_run['decrease']:.5f} (ratio {ratio_loss:.3f})")
    assert fp32_run["decrease"] > 0
    assert all(np.isfinite(half["losses"])), "the half-precision run diverged"
    assert abs(ratio_norm - 1) < 0.1, ratio_norm
    assert abs(ratio_loss - 1) < 0.1, ratio_loss
