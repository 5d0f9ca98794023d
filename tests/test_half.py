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


def test_skipped_fp16_step_leaves_weights_and_schedule(llama, data_root, tmp_path):
    """An inf gradient at the first step: GradScaler skips it (weights unchanged, scale halved) and the cosine
    schedule is not advanced, so the run still spends its whole schedule on real steps."""
    from adapters.methods import attach
    from adapters.train import train
    from landscape.run import method_spec, train_config

    loaded = _loaded(llama, data_root, tmp_path / "run", "float16")
    base = loaded.task.base
    config = dataclasses.replace(train_config(loaded, "ft", torch.device("cpu")), lr=LR, steps=2, batch_size=4)
    assert config.autocast == "float16"
    model = attach(copy.deepcopy(base), method_spec(loaded, "ft"), loaded.task.entry.targets)
    calls = []
    probe = next(p for p in model.parameters() if p.requires_grad)
    probe.register_hook(lambda g: g * float("inf") if not calls.append(1) and len(calls) == 1 else g)
    args = (loaded.task.train, loaded.task.dataset.train.labels)
    kw = {"progress": False, "objective": loaded.task.objective, "checkpoint_every": 1}
    one = dataclasses.replace(config, steps=1)
    history = train(model, *args, one, checkpoint=tmp_path / "one.ckpt", **kw)
    state = torch.load(tmp_path / "one.ckpt", weights_only=True)
    assert history["precision"] == {"storage_dtype": "float16", "master_weights": "float32", "autocast": "float16",
                                    "loss_scaling": True}  # fmt: skip
    assert state["schedule"]["last_epoch"] == 0, "the skipped step advanced the schedule"
    assert state["scaler"]["scale"] == 2.0**15  # GradScaler's 2^16 halved once
    for name, p in model.named_parameters():  # nothing moved (the masters are fp32 copies of the fp16 weights)
        assert p.dtype == torch.float32 and torch.equal(p.detach(), dict(base.named_parameters())[name].float())
    # the same run for 2 steps: the second step is real, and it is the schedule's first
    model = attach(copy.deepcopy(base), method_spec(loaded, "ft"), loaded.task.entry.targets)
    calls.clear()
    probe = next(p for p in model.parameters() if p.requires_grad)
    probe.register_hook(lambda g: g * float("inf") if not calls.append(1) and len(calls) == 1 else g)
    train(model, *args, config, checkpoint=tmp_path / "two.ckpt", **kw)
    state = torch.load(tmp_path / "two.ckpt", weights_only=True)
    assert state["step"] == 2 and state["schedule"]["last_epoch"] == 1
    w0 = dict(base.named_parameters())
    assert any(not torch.equal(p.detach(), w0[n].float()) for n, p in model.named_parameters())


def test_solutions_on_a_bf16_base_train_fp32_and_record_precision(llama, data_root, tmp_path):
    """Through the pipeline: FT is saved in fp32 (ΔW = θ_FT(fp32) − W0), LoRA/RandLoRA factors are fp32, the
    forward runs under bf16 autocast, and each solution.json records how it was trained."""
    import json

    from safetensors.torch import load_file

    from landscape.cli import Stages
    from landscape.config import from_argv
    from landscape.run import load, train_solutions

    argv = ["--model", f"hf:{llama}", "--dataset", "commonsense", "--data-root", str(data_root), "--out",
            str(tmp_path), "--no-progress", "--device", "cpu", "--torch-dtype", "bfloat16", "--train-steps", "2"]
    loaded = load(from_argv(argv))
    assert all(p.dtype == torch.bfloat16 for p in loaded.task.base.parameters())
    solutions = train_solutions(loaded, torch.device("cpu"), Stages(quiet=True))
    for method in ("ft", "lora", "randlora"):
        info = json.loads((tmp_path / "solutions" / method / "solution.json").read_text())
        assert info["precision"] == {"storage_dtype": "bfloat16", "master_weights": "float32",
                                     "autocast": "bfloat16", "loss_scaling": False}, method  # fmt: skip
    ft = load_file(tmp_path / "solutions" / "ft" / "model.safetensors")
    assert ft and all(v.dtype == torch.float32 for v in ft.values())
    assert set(solutions) >= {"ft", "lora", "randlora"}
    for method in ("lora", "randlora"):
        files = list((tmp_path / "solutions" / method).glob("*.safetensors"))
        factors = {k: v for f in files for k, v in load_file(f).items()}
        assert factors and all(v.dtype == torch.float32 for v in factors.values()), method
