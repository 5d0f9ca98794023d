"""1-D linear paths: endpoints are the solutions, interior points equal a naive evaluation,
barriers match a direct computation, and the command works on a tiny run (exit 2 on bad input)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from landscape import connectivity, paths
from landscape.engine.grid import EvalSet
from tests.conftest import TINY_RUN
from tests.synthetic import adapted_few, synthetic_solutions

N_CLASSES = 4


def _solutions(model, seed=0, scale=0.05):
    """Synthetic solutions: ft changes everything, lora/randlora a few matrices and the head."""
    return synthetic_solutions(model, adapted_few(model), scale, seed)


@pytest.fixture(scope="module")
def setup(tiny_entry):
    torch.manual_seed(0)
    model = tiny_entry.build(N_CLASSES)
    sols = _solutions(model)
    texts = [f"sample {i} " + "word " * (i % 7) for i in range(23)]
    data = tiny_entry.encode(texts)
    labels = torch.arange(23) % N_CLASSES
    eval_set = EvalSet.prepare(data, labels, 8, "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = paths.compute_paths(model, sols, eval_set, "cpu", points=5, extend=0.25, progress=False)
    return model, sols, data, labels, result, before


@torch.no_grad()
def _loss(model, data, labels):
    model.eval()
    logits = model(**data.batch(torch.arange(len(labels))))
    return F.cross_entropy(logits.float(), labels).item()


def test_axis_holds_0_and_1_exactly():
    for n, e in [(2, 0.0), (5, 0.25), (21, 0.0), (21, 0.5), (7, 0.3), (3, 1.0)]:
        t = paths.path_axis(n, e)
        assert len(t) == n and 0.0 in t and 1.0 in t and np.all(np.diff(t) > 0), (n, e, t)
    assert paths.path_axis(5, 0.25).tolist() == [-0.25, 0.0, 0.5, 1.0, 1.25]
    assert paths.path_axis(3).tolist() == [0.0, 0.5, 1.0]


def test_endpoints_are_the_solutions(setup):
    model, sols, data, labels, result, before = setup
    t = result["t"]
    assert result["pairs"] == ["ft-lora", "ft-randlora", "lora-randlora"]
    assert result["loss"].shape == result["accuracy"].shape == result["loss_se"].shape == (3, len(t))
    i0, i1 = list(t).index(0.0), list(t).index(1.0)
    for k, pair in enumerate(result["pairs"]):
        a, b = pair.split("-")
        for name, i in ((a, i0), (b, i1)):
            solved = copy.deepcopy(model)
            params = dict(solved.named_parameters())
            with torch.no_grad():
                for n, d in sols[name].delta().items():
                    params[n].add_(d)
            assert result["loss"][k, i] == pytest.approx(_loss(solved, data, labels), rel=1e-5, abs=1e-6), (pair, name)
    # the base model is left untouched
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_interior_point_equals_naive_evaluation(setup):
    model, sols, data, labels, result, _ = setup
    k, j = 2, 2  # lora-randlora at t = 0.5
    t = float(result["t"][j])
    assert t == 0.5
    state = copy.deepcopy(model.state_dict())
    for n in set(sols["lora"].delta()) | set(sols["randlora"].delta()):
        w0 = model.state_dict()[n].float()
        theta_a = w0 + sols["lora"].delta().get(n, 0.0)
        theta_b = w0 + sols["randlora"].delta().get(n, 0.0)
        state[n] = (1 - t) * theta_a + t * theta_b
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(state)
    assert result["loss"][k, j] == pytest.approx(_loss(fresh, data, labels), rel=1e-5, abs=1e-6)
    # outside [0, 1] too: t = 1.25 on ft-lora
    t = float(result["t"][-1])
    state = copy.deepcopy(model.state_dict())
    for n, d in sols["ft"].delta().items():
        w0 = model.state_dict()[n].float()
        state[n] = (1 - t) * (w0 + d) + t * (w0 + sols["lora"].delta().get(n, 0.0))
    fresh.load_state_dict(state)
    assert result["loss"][0, -1] == pytest.approx(_loss(fresh, data, labels), rel=1e-5, abs=1e-6)


def test_barrier_equals_direct_numpy(setup):
    result = setup[4]
    t, loss = result["t"], result["loss"]
    inside = (t >= 0) & (t <= 1)
    # the peak above the endpoint mean of the computed paths, from numpy
    for k, pair in enumerate(result["pairs"]):
        expected = loss[k][inside].max() - (loss[k][t == 0][0] + loss[k][t == 1][0]) / 2
        got = result["barriers"][pair]
        assert got["peak_above_endpoint_mean"] == pytest.approx(expected, abs=1e-12)
        assert got["peak_loss"] == pytest.approx(loss[k][inside].max(), abs=1e-12)
        assert 0.0 <= got["peak_t"] <= 1.0
    # a hand-made path with a known barrier; the peak outside [0, 1] does not count
    b = paths.loss_barrier(np.array([-0.5, 0.0, 0.5, 1.0, 1.5]), np.array([9.0, 1.0, 4.0, 3.0, 9.0]))
    assert b["barrier"] == pytest.approx(2.0) and b["t_max"] == 0.5  # chord at 0.5: (1 + 3) / 2
    assert b["chord_barrier"] == pytest.approx(2.0) and b["chord_t_max"] == 0.5
    assert b["peak_above_endpoint_mean"] == pytest.approx(2.0) and b["peak_t"] == 0.5
    # the barrier (= chord barrier) of the computed paths, from numpy
    for k, pair in enumerate(result["pairs"]):
        above = loss[k][inside] - ((1 - t[inside]) * loss[k][t == 0][0] + t[inside] * loss[k][t == 1][0])
        got = result["barriers"][pair]
        assert got["barrier"] == pytest.approx(above.max(), abs=1e-12) and got["barrier"] >= 0
        assert got["t_max"] == t[inside][np.argmax(above)]
        assert got["loss_max"] == loss[k][inside][np.argmax(above)]
        copies = {"chord_barrier": "barrier", "chord_t_max": "t_max", "chord_loss_max": "loss_max",
                  "chord_barrier_se": "barrier_se"}  # fmt: skip
        assert all(got[c] == got[k] for c, k in copies.items())  # the chord_* keys stay, the same numbers
        assert got["peak_above_endpoint_mean_se"] > 0 and got["barrier_se"] >= 0


def test_both_quantities_against_a_closed_form_path():
    # L(t) = L0 + Δ·t + 4h·t(1 − t): the chord is L0 + Δ·t, so the barrier is h at t = 1/2; the maximum is at
    # t* = (Δ + 4h) / 8h with L(t*) = L0 + (Δ + 4h)² / 16h, so the peak above the endpoint mean is
    # (Δ + 4h)² / 16h − Δ / 2.
    l0, delta, h = 0.3, 1.0, 1.0
    t = np.linspace(-0.25, 1.25, 13)  # step 1/8: t* = 5/8 and 1/2 are on the axis; the ends outside do not count
    loss = l0 + delta * t + 4 * h * t * (1 - t)
    b = paths.loss_barrier(t, loss)
    assert b["barrier"] == pytest.approx(h, abs=1e-12) and b["t_max"] == 0.5
    assert b["loss_max"] == pytest.approx(l0 + delta / 2 + h, abs=1e-12)
    assert b["chord_barrier"] == b["barrier"] and b["chord_t_max"] == 0.5
    assert b["peak_above_endpoint_mean"] == pytest.approx((delta + 4 * h) ** 2 / (16 * h) - delta / 2, abs=1e-12)
    assert b["peak_t"] == 0.625 and b["peak_loss"] == pytest.approx(l0 + (delta + 4 * h) ** 2 / (16 * h), abs=1e-12)
    # a monotone path between endpoints of different loss: half their gap above the mean, no barrier
    line = paths.loss_barrier(t, l0 + delta * t)
    assert line["peak_above_endpoint_mean"] == pytest.approx(delta / 2, abs=1e-12) and line["peak_t"] == 1.0
    assert abs(line["barrier"]) < 1e-12 and not paths.has_barrier(line["barrier"])
    # a path below its chord everywhere inside: the barrier is 0 (at an end), never negative
    valley = paths.loss_barrier(t, l0 + delta * t - 4 * h * t * (1 - t))
    assert valley["barrier"] == 0.0 and valley["t_max"] in (0.0, 1.0)


def test_barrier_errors_against_numpy():
    """Both paired standard errors from per-sample losses, against numpy on the per-sample differences."""
    rng = np.random.default_rng(0)
    t = paths.path_axis(9)
    n = 50
    difficulty = rng.gamma(2.0, 0.5, size=n)  # shared by every point: what pairing cancels
    per_sample = [difficulty * (1 + 0.3 * tj) + 2 * tj * (1 - tj) + 0.1 * rng.normal(size=n) for tj in t]
    loss = np.array([s.mean() for s in per_sample])
    samples = [torch.tensor(s) for s in per_sample]
    b = paths.barriers_with_se(t, loss, samples)
    at = dict(zip(t.tolist(), per_sample, strict=True))
    d = at[b["peak_t"]] - (at[0.0] + at[1.0]) / 2
    assert b["peak_above_endpoint_mean_se"] == pytest.approx(d.std(ddof=1) / np.sqrt(n), rel=1e-12)
    assert b["peak_above_endpoint_mean"] == pytest.approx(d.mean(), abs=1e-12)
    tc = b["t_max"]
    assert 0.0 < tc < 1.0  # the bump 2t(1 − t) is inside: the barrier's SE is not trivially 0
    d = at[tc] - ((1 - tc) * at[0.0] + tc * at[1.0])
    assert b["barrier_se"] == pytest.approx(d.std(ddof=1) / np.sqrt(n), rel=1e-12)
    assert b["barrier"] == pytest.approx(d.mean(), abs=1e-12)
    assert b["chord_barrier_se"] == b["barrier_se"] and b["chord_barrier"] == b["barrier"]
    assert paths.chord_barrier_se(t, samples, b) == b["barrier_se"] == paths.barrier_se(t, samples, b)


def test_write_paths(setup, tmp_path):
    result = setup[4]
    paths.write_paths(result, tmp_path, info={"seed": 0})
    data = np.load(tmp_path / "paths.npz")
    assert data["loss"].shape == (3, 5) and list(data["pairs"]) == ["ft-lora", "ft-randlora", "lora-randlora"]
    assert np.array_equal(data["t"], result["t"])
    meta = json.loads((tmp_path / "paths.json").read_text())
    assert meta["seed"] == 0 and meta["points"] == 5 and meta["extend"] == 0.25
    assert meta["format_version"] == paths.FORMAT_VERSION == 2
    got = meta["pairs"]["ft-lora"]
    for key in ("barrier", "barrier_se", "t_max", "chord_barrier", "chord_barrier_se", "chord_t_max",
                "peak_above_endpoint_mean", "peak_above_endpoint_mean_se", "peak_t"):  # fmt: skip
        assert got[key] == result["barriers"]["ft-lora"][key], key
    assert got["barrier"] == got["chord_barrier"] and got["barrier_se"] == got["chord_barrier_se"]
    assert meta["barrier_definition"] == meta["chord_barrier_definition"] == paths.CHORD_BARRIER_DEFINITION
    assert meta["peak_above_endpoint_mean_definition"] == paths.PEAK_DEFINITION
    assert "(L(theta_A) + L(theta_B)) / 2" in paths.PEAK_DEFINITION
    assert (tmp_path / "paths.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "paths.pdf").read_bytes()[:4] == b"%PDF"
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


# ---------------------------------------------------------------------------- tiny run + CLI ----

TINY = TINY_RUN  # the arguments of run_dir, besides --dataset, --data-root and --out


@pytest.fixture
def run_dir(tiny_wordnet_run):
    """The main job's tiny run (conftest: shared with other test files, read only)."""
    return tiny_wordnet_run


def test_connectivity_records_paths(run_dir):
    meta = json.loads((run_dir / "landscape.json").read_text())
    assert set(meta["paths"]["barrier"]) == {"ft-lora", "ft-randlora", "lora-randlora"}
    assert meta["paths"]["points"] == 3 and meta["config"]["train_per_class"] == 12 and meta["config"]["data_root"]
    for name in ("paths.npz", "paths.json", "paths.png", "paths.pdf"):
        assert (run_dir / name).stat().st_size > 0, name
    recorded = json.loads((run_dir / "paths.json").read_text())["pairs"]
    for key in ("barrier", "barrier_se", "t_max", "chord_barrier", "chord_barrier_se", "chord_t_max",
                "peak_above_endpoint_mean", "peak_above_endpoint_mean_se", "peak_t"):  # fmt: skip
        assert meta["paths"][key] == {p: recorded[p][key] for p in recorded}, key
    assert meta["paths"]["barrier"] == meta["paths"]["chord_barrier"] and meta["paths"]["format_version"] == 2
    assert meta["paths"]["definitions"]["barrier"] == paths.CHORD_BARRIER_DEFINITION
    assert meta["paths"]["definitions"]["peak_above_endpoint_mean"] == paths.PEAK_DEFINITION


def test_cli_rebuilds_the_run_exactly(run_dir, tmp_path, capsys):
    assert paths.main(["--run", str(run_dir), "--out", str(tmp_path), "--points", "3", "--no-progress"]) == 0
    printed = capsys.readouterr()
    assert "warning" not in printed.err
    ours, runs = np.load(tmp_path / "paths.npz"), np.load(run_dir / "paths.npz")
    assert np.allclose(ours["loss"], runs["loss"], rtol=1e-6, atol=1e-7)
    meta = json.loads((tmp_path / "paths.json").read_text())
    assert meta["seed"] == 0 and meta["eval_samples"] == 16 and meta["dataset"] == "wordnet"
    # the path endpoints are the solutions the run evaluated at the plane's vertices
    run_meta = json.loads((run_dir / "landscape.json").read_text())
    assert meta["pairs"]["ft-lora"]["loss_t0"] == pytest.approx(run_meta["solutions"]["ft"]["vertex_loss"], rel=1e-5)
    for name in ("paths.png", "paths.pdf", "paths.json"):
        assert (tmp_path / name).stat().st_size > 0
    # the printed summary: the barrier ("no barrier" at or below the chord), then the peak, never called a barrier
    for pair, b in meta["pairs"].items():
        head = "no barrier" if not paths.has_barrier(b["barrier"]) else f"barrier {b['barrier']:.4f} ± "
        line = next(x for x in printed.out.splitlines() if x.startswith(pair + " "))
        assert line.split(maxsplit=1)[1].startswith(head), line
        assert f"; peak above the endpoint mean {b['peak_above_endpoint_mean']:.4f} ± " in line


def test_cli_bad_input_exits_2(run_dir, tmp_path, capsys):
    def bad(argv):
        assert paths.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0]
        return err[0]

    assert "does not exist" in bad(["--run", str(tmp_path / "nope")])
    assert "no landscape.json" in bad(["--run", str(tmp_path)])
    assert "at least 2 points" in bad(["--run", str(run_dir), "--points", "1"])
    assert ">= 0" in bad(["--run", str(run_dir), "--extend", "-1"])
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "landscape.json").write_text("{ not json")
    assert "corrupt" in bad(["--run", str(corrupt)])
    assert not list(tmp_path.glob("**/paths.*")), "bad input must write nothing"
    assert connectivity.main([*TINY, "--path-points", "1", "--out", str(tmp_path / "x")]) == 2
    assert "--path-points" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_paths_without_lora_or_randlora_refused_before_work(wordnet_root, tmp_path, capsys, no_figure_drawing):
    """A random chart of FT alone trains and charts with --path-points 0; asking for paths is refused before any
    work, by the main job (it failed after the grid, leaving files) and by the paths command on such a run."""
    given = ["--dataset", "wordnet", "--data-root", str(wordnet_root), *TINY, "--methods", "ft", "--chart",
             "random-line", "--center", "ft", "--draws", "1"]  # fmt: skip
    assert connectivity.main([*given, "--out", str(tmp_path / "paths")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--path-points 3: the paths run between" in err and "--path-points 0" in err
    assert not (tmp_path / "paths").exists()
    run = tmp_path / "ft-alone"
    assert connectivity.main([*given, "--path-points", "0", "--out", str(run)]) == 0
    capsys.readouterr()
    assert paths.main(["--run", str(run), "--points", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "has no lora and no randlora" in err, err
    assert not list(run.glob("paths.*"))


def test_paths_figure_draws_the_chords(setup):
    from landscape import render

    result = setup[4]
    (ax,) = render.paths_figure(result).axes
    lines = [(tuple(ln.get_xdata()), tuple(ln.get_ydata())) for ln in ax.get_lines()]
    for pair in result["pairs"]:
        b = result["barriers"][pair]
        assert ((0.0, 1.0), (b["loss_t0"], b["loss_t1"])) in lines, pair
    legend = [x.get_text() for x in ax.get_legend().get_texts()]
    b = result["barriers"]["ft-lora"]
    want = f"barrier {b['barrier']:.3g}" if paths.has_barrier(b["barrier"]) else "no barrier"
    assert legend[0].endswith(f"({want})") and not any("mean endpoint" in text for text in legend)


def test_readings_mention_the_barrier_and_the_peak_apart():
    from experiments.figures import _barriers

    pairs = ("ft-lora", "lora-randlora", "ft-randlora")
    values = {
        "barrier": (0.004, 0.03, 0.0),
        "barrier_se": (0.003, 0.01, 0.0),
        "peak_above_endpoint_mean": (0.02, 0.01, 0.05),
        "peak_above_endpoint_mean_se": (0.005, 0.01, 0.01),
    }
    summary = {key: dict(zip(pairs, v, strict=True)) for key, v in values.items()}
    text = _barriers(summary)
    barriers, peaks = text.split("Peak above the endpoint mean")
    assert "ft-lora 0.0040 ± 0.0030 (within noise)" in barriers  # 0.004 < 2·0.003
    assert "lora-randlora 0.0300 ± 0.0100;" in barriers and "ft-randlora no barrier." in barriers
    assert "chord" in barriers and "Entezari" in barriers
    assert "ft-lora 0.0200 ± 0.0050;" in peaks and "lora-randlora 0.0100 ± 0.0100 (within noise)" in peaks
    assert "ft-randlora 0.0500 ± 0.0100" in peaks and "not a barrier" in peaks and "barrier 0.05" not in text
    # a run from before format 2: its "barrier" was the peak, its "chord_barrier" the barrier
    old = _barriers({"barrier": {"ft-lora": 0.02}, "barrier_se": {"ft-lora": 0.005},
                     "chord_barrier": {"ft-lora": 0.0}, "chord_barrier_se": {"ft-lora": 0.0}})  # fmt: skip
    barriers, peaks = old.split("Peak above the endpoint mean")
    assert "ft-lora no barrier" in barriers and "ft-lora 0.0200 ± 0.0050" in peaks
    older = _barriers({"barrier": {"ft-lora": 0.02}, "barrier_se": {"ft-lora": 0.005}})  # before the chord
    assert older.startswith("Peak above the endpoint mean") and "ft-lora 0.0200 ± 0.0050" in older


def test_endpoints_reuse_the_planes_vertices(setup):
    """With the plane's vertex results (``known``), each line evaluates only its interior points, and its numbers
    equal the line evaluated in full to fp32 rounding (the vertex is θ_s built through the plane's chart)."""
    from landscape import report
    from landscape.engine.grid import PlaneEvaluator
    from landscape.engine.plane import build_chart, solution_weights

    model, sols, _, _, result, _ = setup
    eval_set = EvalSet.prepare(setup[2], setup[3], 8, "cpu")
    thetas = solution_weights(dict(model.named_parameters()), {s: sols[s].delta() for s in sols})
    plane = PlaneEvaluator(copy.deepcopy(model), build_chart("paper", thetas), eval_set, "cpu")
    known = report.vertex_results(plane.chart, plane)
    assert report.vertex_results(plane.chart, plane) is not known and all(
        report.vertex_results(plane.chart, plane)[s] is known[s] for s in known
    )  # evaluated once, kept on the evaluator
    calls = []
    real = PlaneEvaluator.evaluate

    def counting(self, *args, **kwargs):
        calls.append(args)
        return real(self, *args, **kwargs)

    PlaneEvaluator.evaluate = counting
    try:
        reused = paths.compute_paths(model, sols, eval_set, "cpu", points=5, extend=0.25, progress=False,
                                     storage="dense", known=known)  # fmt: skip
    finally:
        PlaneEvaluator.evaluate = real
    assert len(calls) == 3 * (5 - 2)  # t = 0 and t = 1 of each pair come from the vertices
    for key in ("loss", "accuracy", "loss_se"):
        np.testing.assert_allclose(reused[key], result[key], rtol=1e-5, atol=1e-6)
    for pair, b in result["barriers"].items():
        for k, v in b.items():
            if isinstance(v, float):
                assert reused["barriers"][pair][k] == pytest.approx(v, rel=1e-4, abs=1e-5), (pair, k)


def test_computing_paths_imports_no_plotting():
    """compute_paths needs no matplotlib (about 31 MB resident once imported, counted in the paths stage's memory
    by experiments.benchmarks.llm_scale): only write_paths, which draws the figure, imports it."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; import landscape.paths; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'plotly')))")  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert done.stdout.strip() == "[]", done.stdout[:200]


def test_line_weights_hold_no_zero_direction(setup):
    """A line's V is a zero scalar per parameter (no model-sized zeros), and the weights the engine writes at t are
    θ_A + t·(θ_B − θ_A) computed here, to fp32 rounding (the y term is left out at y = 0)."""
    from landscape.engine.grid import PlaneEvaluator

    model, sols, data, labels, *_ = setup
    base = {n: p.detach().float() for n, p in model.named_parameters()}
    deltas = {s: sols[s].delta() for s in ("ft", "lora")}
    theta = {s: {n: base[n] + d.get(n, torch.zeros_like(base[n])) for n in base} for s, d in deltas.items()}
    chart = paths.line_chart(theta["ft"], theta["lora"])
    assert all(v.numel() == 1 and float(v) == 0.0 for v in chart.v.values())
    evaluator = PlaneEvaluator(copy.deepcopy(model), chart, EvalSet.prepare(data, labels, 8, "cpu"), "cpu")
    params = dict(evaluator.model.named_parameters())
    for t in (0.0, 0.35, 1.0, 1.25):
        evaluator.set_point(t, 0.0)
        for n in base:
            expected = theta["ft"][n] + t * (theta["lora"][n] - theta["ft"][n])
            torch.testing.assert_close(params[n], expected, rtol=1e-6, atol=1e-7, msg=f"{n} at t = {t}")


@pytest.mark.parametrize("chart_name", ["paper", "orthonormal"])
def test_lines_on_the_dense_plane_are_the_lines(setup, monkeypatch, chart_name):
    """Given the plane's dense evaluator, the lines are evaluated on it (at the plane coordinates of θ_A + t·(θ_B −
    θ_A), t outside [0, 1] too) with no θ's or model copy of their own, and their numbers are the line charts' to
    fp32 rounding; a chart whose vertices are not the lines' ends (a random chart's centre) is not used."""
    from landscape.engine.grid import PlaneEvaluator
    from landscape.engine.plane import build_chart, random_chart, solution_weights

    model, sols, data, labels, result, before = setup
    eval_set = EvalSet.prepare(data, labels, 8, "cpu")
    thetas = solution_weights(dict(model.named_parameters()), {s: sols[s].delta() for s in sols})
    plane = PlaneEvaluator(copy.deepcopy(model), build_chart(chart_name, thetas), eval_set, "cpu")

    def no_lines_of_its_own(*args, **kwargs):
        raise AssertionError("the lines built their own θ's")

    with monkeypatch.context() as m:
        m.setattr(paths, "_dense_line_evaluators", no_lines_of_its_own)
        on_plane = paths.compute_paths(model, sols, eval_set, "cpu", points=5, extend=0.25, progress=False,
                                       plane=plane)  # fmt: skip
    assert on_plane["storage"] == "dense"
    for key in ("loss", "accuracy", "loss_se"):
        np.testing.assert_allclose(on_plane[key], result[key], rtol=1e-5, atol=1e-6, err_msg=key)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    centre = thetas["lora"]
    u, v = ({n: 0.01 * torch.randn(w.shape, generator=g) for n, w in centre.items()} for g in
            (torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)))  # fmt: skip
    centred = PlaneEvaluator(copy.deepcopy(model), random_chart(centre, u, v, "lora"), eval_set, "cpu")
    calls = []
    real = paths._dense_line_evaluators
    monkeypatch.setattr(paths, "_dense_line_evaluators", lambda *a, **k: calls.append(1) or real(*a, **k))
    apart = paths.compute_paths(model, sols, eval_set, "cpu", points=5, extend=0.25, progress=False, plane=centred)
    assert calls == [1] and np.array_equal(apart["loss"], result["loss"])
