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
            "--no-progress", "--device", "cpu", "--torch-dtype", dtype]  # fmt: skip
    return load(from_argv(argv))


def _fp32_loss(model: torch.nn.Module, loaded) -> float:
    """The mean training loss of an fp32 copy of ``model``: the same yardstick for every storage dtype."""
    from adapters.train import evaluate

    task = loaded.task
    copy32 = copy.deepcopy(model).float()
    return evaluate(copy32, task.train, task.dataset.train.labels, 64, "cpu", "none", task.objective)[0]


def _ft_run(llama: Path, data_root: Path, out: Path, dtype: str, autocast: str | None = None) -> dict:
    """FT through the toolkit (its own train config, lr 1e-5, 30 steps; ``autocast``: the forward's, instead of the
    config's): ΔW norm and loss decrease, in fp32."""
    from adapters.methods import attach
    from adapters.train import train
    from landscape.run import method_spec, train_config

    loaded = _loaded(llama, data_root, out, dtype)
    base = loaded.task.base
    config = dataclasses.replace(train_config(loaded, "ft", torch.device("cpu")), lr=LR, steps=STEPS, batch_size=4)
    config = config if autocast is None else dataclasses.replace(config, autocast=autocast)
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


# the run's own forward (fp32 here: the half weights are widened, adapters.upcast) and the mixed forward of a
# device with native half arithmetic (autocast to the storage dtype), which the masters must survive too
@pytest.mark.parametrize("dtype, autocast", [("bfloat16", None), ("float16", None), ("bfloat16", "bfloat16"),
                                             ("float16", "float16")])  # fmt: skip
def test_half_storage_ft_moves_like_fp32(llama, data_root, tmp_path, fp32_run, dtype, autocast):
    half = _ft_run(llama, data_root, tmp_path, dtype, autocast)
    ratio_norm = half["delta_norm"] / fp32_run["delta_norm"]
    ratio_loss = half["decrease"] / fp32_run["decrease"]
    print(
        f"{dtype}: ΔW norm {half['delta_norm']:.5f} vs fp32 {fp32_run['delta_norm']:.5f} (ratio {ratio_norm:.3f}); "
        f"loss decrease {half['decrease']:.5f} vs {fp32_run['decrease']:.5f} (ratio {ratio_loss:.3f})"
    )
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
    # on this CPU the fp16 model multiplies in fp32 (adapters.upcast); fp16 autocast, as a bf16-capable GPU's
    # default gives it, is asked for
    assert config.autocast == "none"
    config = dataclasses.replace(config, autocast="float16")
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
                                    "compute_dtype": "float16", "loss_scaling": True}  # fmt: skip
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
    forward runs in fp32 (the suite pins no native bf16: the bf16 weights are widened as they are used), and
    each solution.json records how it was trained."""
    import json

    from safetensors.torch import load_file, save_file

    from adapters.solution import load_solution
    from landscape.cli import Stages
    from landscape.config import from_argv
    from landscape.run import load, train_solutions
    from landscape.spectrum.floor import floor_dtype

    argv = [
        "--model",
        f"hf:{llama}",
        "--dataset",
        "commonsense",
        "--data-root",
        str(data_root),
        "--out",
        str(tmp_path),
        "--no-progress",
        "--device",
        "cpu",
        "--torch-dtype",
        "bfloat16",
        "--train-steps",
        "2",
    ]
    loaded = load(from_argv(argv))
    assert all(p.dtype == torch.bfloat16 for p in loaded.task.base.parameters())
    solutions = train_solutions(loaded, torch.device("cpu"), Stages(quiet=True))
    for method in ("ft", "lora", "randlora"):
        info = json.loads((tmp_path / "solutions" / method / "solution.json").read_text())
        assert info["precision"] == {"storage_dtype": "bfloat16", "master_weights": "float32", "autocast": "none",
                                     "compute_dtype": "float32", "loss_scaling": False}, method  # fmt: skip
    ft = load_file(tmp_path / "solutions" / "ft" / "model.safetensors")
    assert ft and all(v.dtype == torch.float32 for v in ft.values())
    assert set(solutions) >= {"ft", "lora", "randlora"}
    # the rounding floor's dtype: FT from fp32 masters starts at W0 exactly (fp32 floor); an FT stored in bf16
    # (as main's code saved it) rounds θ in bf16; an adapter's ΔW comes from its factors (no floor)
    assert floor_dtype(solutions["ft"]) == torch.float32
    assert floor_dtype(solutions["lora"]) is None and floor_dtype(solutions["randlora"]) is None
    old = tmp_path / "ft_bf16"
    old.mkdir()
    save_file({k: v.to(torch.bfloat16) for k, v in ft.items()}, old / "model.safetensors")
    info = json.loads((tmp_path / "solutions" / "ft" / "solution.json").read_text())
    info.pop("precision")
    info.pop("sha256")  # nor did main's code record the files' sha256
    (old / "solution.json").write_text(json.dumps(info))
    (old / "metrics.json").write_text("{}")
    assert floor_dtype(load_solution(old, base=loaded.task.base)) == torch.bfloat16
    for method in ("lora", "randlora"):
        files = list((tmp_path / "solutions" / method).glob("*.safetensors"))
        factors = {k: v for f in files for k, v in load_file(f).items()}
        assert factors and all(v.dtype == torch.float32 for v in factors.values()), method


# ------------------------------------------------------------------------------------ rounding floor


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(256, 128), (96, 160)])
def test_noise_floor_is_the_top_singular_value_of_real_rounding_noise(dtype, shape):
    """Round a random fp32 matrix to half and back: numpy's largest singular value of the error is the floor."""
    from landscape.spectrum.floor import noise_floor

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])) * 0.02
    noise = (w.to(dtype).float() - w).double().numpy()
    top = np.linalg.svd(noise, compute_uv=False)[0]
    assert abs(noise_floor(w, dtype) / top - 1) < 0.2, (noise_floor(w, dtype), top)
    # it follows |W0| (for a power-of-two scale exactly, but for the few fp16 subnormals near 0)
    assert noise_floor(4 * w, dtype) == pytest.approx(4 * noise_floor(w, dtype), rel=1e-6)
    assert noise_floor(w, torch.float32) < noise_floor(w, dtype) / 1000


def test_planted_update_above_the_floor_counted_tail_marked():
    """A ΔW with singular values (8, 4, 2, 0.5, 0.3, 0.2) × floor: three counted above the floor, the tail marked,
    in spectrum.json and spectrum.csv; the intruders' noise_ratio equals floor / ‖ΔWᵀ u_i‖ from numpy's SVD of
    W0 + ΔW; an adapter (no floor) gets none."""
    from landscape.spectrum import analyse, scalar_rows
    from landscape.spectrum.floor import noise_floor

    g = torch.Generator().manual_seed(1)
    m, n = 64, 48
    w0 = (torch.randn(m, n, generator=g) * 0.05).to(torch.bfloat16)  # the base as stored
    floor = noise_floor(w0, torch.bfloat16)
    u, _ = torch.linalg.qr(torch.randn(m, 6, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, 6, generator=g, dtype=torch.float64))
    planted = np.array([8, 4, 2, 0.5, 0.3, 0.2]) * floor
    delta = (u * torch.from_numpy(planted)) @ v.T
    deltas = {"ft": {"w": delta.float()}, "lora": {"w": delta.float()}}
    out = analyse(deltas, progress=False, base={"w": w0}, floor_dtypes={"ft": torch.bfloat16, "lora": None})
    ft, lora = out["layers"][0]["ft"], out["layers"][0]["lora"]
    assert ft["noise_floor"] == pytest.approx(floor)
    assert ft["rank_above_floor"] == 3
    assert ft["below_floor"][:6] == [False, False, False, True, True, True]
    assert all(ft["below_floor"][6:])  # the zero singular values of the rest are below too
    assert lora["noise_floor"] is None and lora["below_floor"] is None and lora["rank_above_floor"] is None
    assert out["settings"]["rounding_floor"] == {"ft": "bfloat16", "lora": None}
    # intruders: the update's share of each top vector of W0 + ΔW, from numpy
    w = w0.double().numpy() + delta.numpy()
    top_u = np.linalg.svd(w)[0][:, : len(ft["intruders"]["max_cos"])]
    share = np.linalg.norm(delta.numpy().T @ top_u, axis=0)
    np.testing.assert_allclose(ft["intruders"]["noise_ratio"], floor / share, rtol=1e-3)
    assert ft["intruders"]["limited_by_rounding"] == [bool(c < floor) for c in share]
    assert lora["intruders"]["limited_by_rounding"] is None
    cols, rows = scalar_rows(out)
    assert {"noise_floor", "rank_above_floor", "below_floor"} <= set(cols)
    row = next(r for r in rows if r["solution"] == "ft")
    assert row["rank_above_floor"] == 3 and row["below_floor"] == ft["rank"] - 3


# ------------------------------------------------------------------------- the fp32 re-evaluation


@pytest.fixture(scope="module")
def bf16_run(llama, data_root, tmp_path_factory):
    """A bf16-stored run's loaded task and its three solutions (2 steps each)."""
    from landscape.cli import Stages
    from landscape.config import from_argv
    from landscape.run import load, train_solutions

    out = tmp_path_factory.mktemp("bf16run")
    argv = ["--model", f"hf:{llama}", "--dataset", "commonsense", "--data-root", str(data_root), "--out", str(out),
            "--no-progress", "--device", "cpu", "--torch-dtype", "bfloat16", "--train-steps", "2",
            "--eval-samples", "8"]  # fmt: skip
    loaded = load(from_argv(argv))
    return loaded, train_solutions(loaded, torch.device("cpu"), Stages(quiet=True))


@pytest.mark.parametrize("storage", ["dense", "factored"])
def test_fp32_recheck_uses_fp32_weights(bf16_run, storage):
    """precision_check's fp32 losses at the vertices equal an fp32-cast copy of the base with θ_s = W0 + ΔW_s
    written in (no autocast); the evaluator's bf16 weights come back untouched, and its own bf16 losses differ."""
    from adapters.objectives import score
    from landscape.build import plane
    from landscape.report import precision_check
    from landscape.run import eval_set

    loaded, solutions = bf16_run
    loaded.config.plane_storage = storage
    cpu = torch.device("cpu")
    chart, _, _, evaluator = plane(loaded, solutions, cpu)
    assert chart.info["storage"] == storage and not evaluator.autocast
    before = {n: p.detach().clone() for n, p in evaluator.model.named_parameters()}
    summary = {s: {"vertex_loss": evaluator.evaluate(*chart.vertices[s]).loss} for s in chart.vertices}
    check = precision_check(summary, chart, evaluator)
    assert check is not None and check["run_precision"]["weights"] == "bfloat16"
    evals = eval_set(loaded, cpu)
    for s in ("ft", "lora", "randlora"):
        reference = copy.deepcopy(loaded.task.base).float()  # an explicitly fp32-cast copy
        params = dict(reference.named_parameters())
        with torch.no_grad():
            for name, d in solutions[s].delta().items():
                params[name].add_(d.float())
        ref = score(lambda inputs, m=reference: m(**inputs), evals.batches, evals.n, loaded.task.objective)[0].loss
        assert check["vertex_loss_fp32"][s] == pytest.approx(ref, abs=1e-5), s
        # the run's own numbers came from bf16 weights (each point's weights rounded to bf16, then multiplied in
        # fp32, adapters.upcast): the check sees the difference; it and the reference agree ten times closer
        gap = abs(summary[s]["vertex_loss"] - ref)
        assert gap > 1e-6 and gap > 10 * abs(check["vertex_loss_fp32"][s] - ref), s
    for n, p in evaluator.model.named_parameters():  # the evaluator's weights are back as they were
        assert p.dtype == before[n].dtype == torch.bfloat16, n
        if storage == "factored":  # the base itself, never written
            assert torch.equal(p.detach(), before[n]), n
    assert not evaluator.autocast
    if storage == "factored":
        evaluator.close()
