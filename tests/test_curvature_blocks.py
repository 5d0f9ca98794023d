"""Curvature per block (:mod:`landscape.curvature.blocks`) against the dense Hessian of a tiny two-layer model
(torch.autograd.functional.hessian + numpy): each block's top eigenvalue and trace are its diagonal block's,
interlacing, the block traces sum to the whole Hutchinson trace on the same probes; the JS distance against
scipy's; the command on the tiny run (blocks.json's names) and its one-line errors."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon
from torch import nn

from adapters.objectives import OBJECTIVES
from landscape import curvature
from landscape.curvature import blocks, solvers
from landscape.engine.grid import EvalSet
from tests.test_curvature import exact_hessian

CE = OBJECTIVES["classification"]
trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has trapz only


class Layer(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.attn = nn.Linear(width, width)
        self.mlp = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + torch.tanh(self.attn(x))
        return x + torch.tanh(self.mlp(x))


class TwoLayers(nn.Module):
    """6 → two residual layers (attn, mlp) → 3: 189 parameters named like a transformer's (layers.N.*)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Layer(6), Layer(6)])
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


@pytest.fixture(scope="module")
def two_layers():
    torch.manual_seed(0)
    model = TwoLayers()
    for p in model.parameters():  # larger weights: a Hessian far from diagonal, with negative eigenvalues
        nn.init.normal_(p, std=0.6)
    x, y = torch.randn(25, 6), torch.randint(0, 3, (25,))
    eval_set = EvalSet([({"x": x[:9]}, y[:9]), ({"x": x[9:]}, y[9:])], 25)
    names = [n for n, _ in model.named_parameters()]
    exact = exact_hessian(
        model, names, lambda m, p: F.cross_entropy(torch.func.functional_call(m, p, (x.double(),)), y)
    )
    return model, eval_set, names, exact


def _slices(names, model):
    sizes = dict((n, p.numel()) for n, p in model.named_parameters())
    offsets = np.cumsum([0] + [sizes[n] for n in names])
    return {n: np.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(names)}


SETTINGS = dict(top_k=1, tol=1e-10, trace_probes=60, slq_probes=2, slq_steps=12, dtype="float64")


@pytest.mark.parametrize("block_by", ["layer", "module"])
def test_blocks_equal_the_dense_hessians_diagonal_blocks(two_layers, block_by):
    model, eval_set, names, exact = two_layers
    settings = curvature.CurvatureSettings(**SETTINGS)
    result = blocks.block_curvature(copy.deepcopy(model), names, eval_set, CE, settings, block_by)
    expected = {
        "layer": ["layer 0", "layer 1", "head"],
        "module": ["layer 0 attention", "layer 0 mlp", "layer 1 attention", "layer 1 mlp", "head"],
    }[block_by]
    assert [b["name"] for b in result["blocks"]] == expected
    index = _slices(names, model)
    whole_top = np.linalg.eigvalsh(exact)[-1]
    assert result["top_eigenvalue"] == pytest.approx(whole_top, rel=1e-7)
    # the probes of hutchinson_trace (same seed stream), replayed on the dense matrix
    generator = torch.Generator().manual_seed(solvers._stream_seed(settings.seed, 1))
    probes = [solvers._rademacher(exact.shape[0], generator, torch.float64).numpy() for _ in range(60)]
    groups = blocks.group_blocks(names, block_by)
    for entry in result["blocks"]:
        idx = np.concatenate([index[n] for n in groups[entry["name"]]])
        h_bb = exact[np.ix_(idx, idx)]
        assert entry["dim"] == len(idx)
        # the top eigenvalue of the diagonal block, by Lanczos on the block's own operator
        assert entry["top_eigenvalue"] == pytest.approx(np.linalg.eigvalsh(h_bb)[-1], rel=1e-7)
        # Cauchy interlacing: a principal submatrix's top eigenvalue never exceeds the whole's
        assert entry["top_eigenvalue"] <= whole_top * (1 + settings.tol) + 1e-12
        # the block's trace estimate: per probe z_bᵀ(Hz)_b, its mean within 4 SE of tr H_bb
        samples = [float(z[idx] @ (exact @ z)[idx]) for z in probes]
        assert entry["trace"] == pytest.approx(np.mean(samples), rel=1e-9, abs=1e-12)
        assert entry["trace_se"] == pytest.approx(np.std(samples, ddof=1) / np.sqrt(60), rel=1e-7)
        assert abs(entry["trace"] - np.trace(h_bb)) < 4 * entry["trace_se"]
    # the block traces sum to the whole Hutchinson trace on the same probes, which is hutchinson_trace's
    assert sum(b["trace"] for b in result["blocks"]) == pytest.approx(result["trace"], rel=1e-10)
    op = curvature.HessianOperator(copy.deepcopy(model), names, eval_set, CE, "float64")
    assert result["trace"] == pytest.approx(curvature.hutchinson_trace(op, 60, settings.seed)["trace"], rel=1e-10)
    js = np.asarray(result["js_distance"])
    assert js.shape == (len(expected),) * 2 and np.allclose(js, js.T) and np.all(np.diag(js) == 0)
    assert np.all((js >= 0) & (js <= 1)) and js.max() > 0
    np.testing.assert_allclose([b["js_mean"] for b in result["blocks"]], js.sum(1) / (len(js) - 1), rtol=1e-12)


def test_js_distance_equals_its_formula():
    rng = np.random.default_rng(0)
    densities = [{"nodes": [rng.normal(size=5).tolist(), rng.normal(size=5).tolist()],
                  "weights": [rng.dirichlet(np.ones(5)).tolist() for _ in range(2)]} for _ in range(3)]  # fmt: skip
    grid, values, sigma = blocks.common_densities(densities, 300, 0.02)
    assert values.shape == (3, 300) and np.allclose(trapezoid(values, grid), 1, atol=1e-3)

    distances = blocks.js_distances(values)
    for i in range(3):
        for j in range(3):
            assert distances[i, j] == pytest.approx(jensenshannon(values[i], values[j], base=2), abs=1e-9)
    # a tail below the smallest normal number: scipy's midpoint underflows (an infinite term), ours stays finite
    tails = np.array([[1.0, 1e-320, 0.0], [1.0, 0.0, 1e-320]])
    assert np.isfinite(blocks.js_distances(tails)).all() and blocks.js_distances(tails)[0, 1] < 1e-6
    same = blocks.common_densities([densities[0], densities[0]], 300, 0.02)[1]
    assert blocks.js_distances(same)[0, 1] == pytest.approx(0, abs=1e-7)


FAST = ["--trace-probes", "3", "--slq-probes", "1", "--slq-steps", "4", "--no-progress"]


def test_command_writes_blocks_json(tiny_wordnet_run, tmp_path, capsys):
    out = tmp_path / "b"
    argv = ["--run", str(tiny_wordnet_run), "--out", str(out), "--blocks", "--solutions", "lora", *FAST]
    assert curvature.main(argv) == 0
    assert (out / "blocks.png").stat().st_size > 0 and (out / "blocks.pdf").stat().st_size > 0
    assert not (out / "curvature.json").exists()
    result = json.loads((out / "blocks.json").read_text())
    assert result["complete"] and result["block_by"] == "layer" and result["seed"] == 0
    for coordinates in ("weights", "adapter"):
        entry = result["solutions"]["lora"][coordinates]
        assert {"trace", "trace_se", "top_eigenvalue", "blocks"} <= set(entry)
        assert len(entry["blocks"]) >= 2 and all(b["name"] for b in entry["blocks"])
        assert sum(b["trace"] for b in entry["blocks"]) == pytest.approx(entry["trace"], rel=1e-6, abs=1e-9)
        assert sum(b["dim"] for b in entry["blocks"]) == entry["dim"]
        for b in entry["blocks"]:
            assert {"name", "trace", "trace_se", "top_eigenvalue"} <= set(b)
            assert b["top_eigenvalue"] <= entry["top_eigenvalue"] * (1 + 1e-3) + 1e-9  # fp32, tol 1e-3
    assert "top eigenvalue" in capsys.readouterr().out
    saved = np.load(out / "blocks.npz")
    entry = result["solutions"]["lora"]["adapter"]
    assert list(saved["lora/adapter/names"]) == [b["name"] for b in entry["blocks"]]
    np.testing.assert_array_equal(saved["lora/adapter/js_distance"], entry["js_distance"])
    assert curvature.main(argv) == 0  # a rerun reuses every entry
    again = json.loads((out / "blocks.json").read_text())["solutions"]["lora"]
    for coordinates, e in again.items():
        assert e["reused"] and {**e, "reused": None} == {**result["solutions"]["lora"][coordinates], "reused": None}
    # full fine-tuning has no adapter coordinates: its entry says so (LoRA's adapter entry reused, not measured)
    assert curvature.main([*argv[:6], "ft", "lora", "--coordinates", "adapter", *FAST]) == 0
    again = json.loads((out / "blocks.json").read_text())["solutions"]
    assert set(again["ft"]) == {"adapter"} and "has no adapter" in again["ft"]["adapter"]["skipped"]
    assert again["lora"]["adapter"]["reused"]


def test_command_bad_input_exits_2_with_one_line(tiny_wordnet_run, tmp_path, capsys, monkeypatch):
    from landscape import run as run_module

    opened = run_module.open_run
    monkeypatch.setattr(run_module, "open_run", lambda *a, **k: type(o := opened(*a, **k))(
        o.run_dir, o.meta, o.loaded, {}, o.eval_set))  # fmt: skip  # a run whose solutions are gone
    out = tmp_path / "bad"
    cases = [(["--run", str(tiny_wordnet_run), "--blocks", "--block-by", "head"], "--block-by"),
             (["--run", str(tiny_wordnet_run), "--blocks"], "no solutions")]  # fmt: skip
    for argv, needle in cases:
        capsys.readouterr()
        assert curvature.main([*argv, "--out", str(out), "--no-progress"]) == 2, argv
        err = capsys.readouterr().err.strip()  # before it, the run's loading may say what it built (budget: ...)
        errors = [line for line in err.splitlines() if "error:" in line]
        assert errors == err.splitlines()[-1:] and needle in errors[0] and "Traceback" not in err, (argv, err)
    assert not out.exists()


def test_stage_of_the_connectivity_run_equals_the_command(
    tmp_path, wordnet_root, tiny_wordnet_run, no_figure_drawing, monkeypatch
):
    """``--blocks`` writes blocks.json next to the run's outputs, entry for entry the numbers that ``python -m
    landscape.curvature --run DIR --blocks`` (the same settings, the run's seed) computes afresh on that run; without
    it (the shared run) there is none. RandLoRA alone, and cheaper settings than the defaults on both sides (the
    stage reads the defaults of ``CurvatureSettings``, patched here; the command gets them as flags): at the
    defaults each entry costs ~17 s and this was still the suite's slowest test (115 s on a 2-core Zen 3); the stage
    measures both coordinates, the command recomputes the weights' (the cheaper; an entry's key leaves out which
    coordinates were asked for); FT's skipped adapter entry is test_command_writes_blocks_json's."""
    import functools

    from landscape import connectivity
    from tests.conftest import TINY_RUN

    cheap = {"tol": 1e-2, "trace_probes": 6, "slq_probes": 1, "slq_steps": 12}
    monkeypatch.setattr(curvature, "CurvatureSettings", functools.partial(curvature.CurvatureSettings, **cheap))
    run = tmp_path / "run"
    assert connectivity.main(["--dataset", "wordnet", "--data-root", str(wordnet_root), "--out", str(run), *TINY_RUN,
                              "--methods", "randlora", "--chart", "random", "--center", "randlora",
                              "--path-points", "0", "--blocks"]) == 0  # fmt: skip
    meta = json.loads((run / "landscape.json").read_text())
    assert meta["config"]["blocks"] and "blocks" in meta["wall_time_s"]
    assert all((run / f"blocks.{e}").is_file() for e in ("json", "npz", "png", "pdf"))
    stage = json.loads((run / "blocks.json").read_text())
    out = tmp_path / "recipe"  # a folder of its own: nothing to reuse, every entry computed again
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in cheap.items()]
    assert curvature.main(["--run", str(run), "--blocks", "--solutions", "randlora", "--coordinates", "weights",
                           "--seed", str(meta["config"]["seed"]), "--out", str(out), "--no-progress",
                           *flags]) == 0  # fmt: skip
    recipe = json.loads((out / "blocks.json").read_text())
    assert stage["complete"] and stage["seed"] == recipe["seed"]
    assert stage["settings"] == {**recipe["settings"], "coordinates": ["weights", "adapter"]}
    assert stage["settings"]["trace_probes"] == cheap["trace_probes"]  # what the stage was given
    assert stage["eval_samples"] == recipe["eval_samples"] == meta["eval_samples"]
    assert set(stage["solutions"]) == set(recipe["solutions"]) == {"randlora"}
    assert set(stage["solutions"]["randlora"]) == {"weights", "adapter"} and set(recipe["solutions"]["randlora"]) == {
        "weights"}  # fmt: skip
    for name, per in recipe["solutions"].items():
        for coordinates, e in per.items():
            s = stage["solutions"][name][coordinates]
            assert s["key"] == e["key"] and not s.get("reused") and not e.get("reused")
            for k in ("top_eigenvalue", "trace", "trace_se", "loss"):
                assert s[k] == pytest.approx(e[k], rel=1e-5, abs=1e-8), (name, coordinates, k)
            assert [b["name"] for b in s["blocks"]] == [b["name"] for b in e["blocks"]]
            for a, b in zip(s["blocks"], e["blocks"], strict=True):
                for k in ("top_eigenvalue", "trace", "trace_se"):
                    assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-8), (name, coordinates, a["name"], k)
            np.testing.assert_allclose(s["js_distance"], e["js_distance"], rtol=1e-4, atol=1e-6)
    assert not (tiny_wordnet_run / "blocks.json").exists()
    assert not json.loads((tiny_wordnet_run / "landscape.json").read_text())["config"]["blocks"]
