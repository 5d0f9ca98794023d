"""Random directions around one solution (Li et al. 2018): filter / layer / model normalisation against hand-computed
values and numpy, the centre of the grid equals the solution's own loss, the grid equals loss-landscapes'
random_plane fed the same directions, adapter coordinates against peft's own merge, determinism, and the
command line end to end (random plane, random line, adapter coordinates, bad --center)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapters.errors import UserError
from adapters.models.base import Encoded
from adapters.objectives import OBJECTIVES, score
from landscape import build, connectivity
from landscape import config as run_config
from landscape.engine import directions
from landscape.engine.grid import EvalSet, PlaneEvaluator, run_grid
from landscape.engine.plane import RANDOM_CHARTS, default_axes
from tests import nodraw

NUM_CLASSES = 4
# The peft model's factored forward against merged fp32 weights: fp32 rounding of a large ΔW (the solutions here
# are perturbed by 0.2·N(0, 1); in fp64 the two agree to 4e-6 at the centre). A wrong rule is off by ≫ 1e-3.
ADAPTER_TOL = 5e-5


def _loss(model: nn.Module, evals: EvalSet) -> float:
    """The mean loss of a plain model on the evaluation set (the reference every grid point is held to)."""
    model.eval()
    with torch.no_grad():
        return score(lambda inputs: model(**inputs), evals.batches, evals.n)[0].loss


# --------------------------------------------------------------------------- normalisation


def _hand_case() -> tuple[dict, dict]:
    """θ* and a direction whose normalised values are worked out by hand below."""
    weights = {
        "fc.weight": torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]]),  # row norms 5, 0, 1
        "fc.bias": torch.tensor([3.0, 4.0, 0.0]),  # norm 5
        "conv.weight": torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[2.0, 0.0], [0.0, 0.0]]]]),  # channel norms 2, 2
        "norm.weight": torch.tensor([1.0, 1.0]),
    }
    direction = {
        "fc.weight": torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, -3.0]]),  # row norms 1, √8, 3
        "fc.bias": torch.tensor([0.0, 2.0, 0.0]),
        "conv.weight": torch.tensor([[[[0.5, 0.5], [0.5, 0.5]]], [[[0.0, 3.0], [4.0, 0.0]]]]),  # channel norms 1, 5
        "norm.weight": torch.tensor([0.3, -0.4]),
    }
    return weights, direction


def test_filter_normalisation_hand_computed():
    weights, direction = _hand_case()
    d = directions.normalize({k: v.clone() for k, v in direction.items()}, weights, "filter", "biasbn")
    close = lambda a, b: torch.testing.assert_close(a, torch.tensor(b), rtol=1e-6, atol=1e-6)  # noqa: E731
    close(d["fc.weight"], [[5.0, 0.0], [0.0, 0.0], [0.0, -1.0]])  # rows of a Linear; a zero row of θ* gives zero
    close(d["conv.weight"], [[[[1.0, 1.0], [1.0, 1.0]]], [[[0.0, 1.2], [1.6, 0.0]]]])  # output channels of a conv
    close(d["fc.bias"], [0.0, 0.0, 0.0])  # biasbn: biases and norm parameters get no direction
    close(d["norm.weight"], [0.0, 0.0])
    d = directions.normalize({k: v.clone() for k, v in direction.items()}, weights, "filter", "none")
    close(d["fc.bias"], [0.0, 5.0, 0.0])  # included: a 1-D tensor is one filter
    close(d["norm.weight"], [0.3 * 2**0.5 / 0.5, -0.4 * 2**0.5 / 0.5])


def test_layer_and_model_normalisation_hand_computed():
    weights, direction = _hand_case()
    d = directions.normalize({k: v.clone() for k, v in direction.items()}, weights, "layer", "biasbn")
    torch.testing.assert_close(d["fc.weight"], direction["fc.weight"] * math.sqrt(26 / 18))  # ‖θ‖² 26, ‖d‖² 18
    torch.testing.assert_close(d["conv.weight"], direction["conv.weight"] * math.sqrt(8 / 26))  # 8 and 1 + 25
    assert not d["fc.bias"].any() and not d["norm.weight"].any()
    d = directions.normalize({k: v.clone() for k, v in direction.items()}, weights, "model", "biasbn")
    scale = math.sqrt((26 + 8) / (18 + 26))  # over the parameters that move: fc and conv weights
    for name in ("fc.weight", "conv.weight"):
        torch.testing.assert_close(d[name], direction[name] * scale)
    assert not d["fc.bias"].any()
    d = directions.normalize({k: v.clone() for k, v in direction.items()}, weights, "model", "none")
    scale = math.sqrt((26 + 8 + 25 + 2) / (18 + 26 + 4 + 0.25))  # every parameter, biases and norms included
    for name in direction:
        torch.testing.assert_close(d[name], direction[name] * scale)


class TinyConv(nn.Module):
    """A conv net with batch norm: filters are output channels (conv) and rows (fc)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.conv(pixel_values))), 2)
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def conv():
    torch.manual_seed(0)
    net = TinyConv()
    with torch.no_grad():  # non-trivial batch-norm state, used in eval mode
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.1, 0.1)
    images, labels = torch.randn(20, 3, 8, 8), torch.arange(20) % 3
    return net.eval(), EvalSet.prepare(Encoded({"pixel_values": images}), labels, 8, "cpu")


@pytest.mark.parametrize("norm", ["filter", "layer", "model"])
def test_drawn_directions_have_the_scale_of_the_weights(conv, norm):
    net, _ = conv
    weights = {n: p.detach().clone() for n, p in net.named_parameters()}
    (d,) = directions.draw_directions(weights, seed=3, norm=norm, count=1)
    flat = lambda t: t.double().numpy().reshape(len(t), -1)  # noqa: E731 (filters as numpy rows)
    for name, w in weights.items():
        if w.dim() <= 1:
            assert not d[name].any(), name  # biasbn: conv / fc biases, bn weight and bias
        elif norm == "filter":
            rows, want = np.linalg.norm(flat(d[name]), axis=1), np.linalg.norm(flat(w), axis=1)
            np.testing.assert_allclose(rows, want, rtol=1e-5)
        elif norm == "layer":
            assert np.linalg.norm(flat(d[name])) == pytest.approx(np.linalg.norm(flat(w)), rel=1e-5)
    if norm == "model":
        moved = [n for n, w in weights.items() if w.dim() > 1]
        total = lambda ts: math.sqrt(sum(float(np.sum(flat(t) ** 2)) for t in ts))  # noqa: E731
        assert total(d[n] for n in moved) == pytest.approx(total(weights[n] for n in moved), rel=1e-5)


def test_same_seed_same_directions_other_seed_other_directions(conv):
    net, _ = conv
    weights = {n: p.detach().clone() for n, p in net.named_parameters()}
    a = directions.draw_directions(weights, seed=5)
    b = directions.draw_directions(weights, seed=5)
    c = directions.draw_directions(weights, seed=6)
    for n in weights:
        for k in range(2):
            assert torch.equal(a[k][n], b[k][n]), n
    assert all(not torch.equal(a[0][n], c[0][n]) for n in weights if weights[n].dim() > 1)
    assert not torch.equal(a[0]["fc.weight"], a[1]["fc.weight"])  # δ and η differ
    line = directions.draw_chart(weights, "ft", seed=5, line=True)  # a line is the plane's δ
    plane = directions.draw_chart(weights, "ft", seed=5)
    assert line.name == "random-line" and plane.name == "random" and set(RANDOM_CHARTS) == {line.name, plane.name}
    assert all(torch.equal(line.u[n], plane.u[n]) and torch.equal(plane.u[n], a[0][n]) for n in weights)
    assert plane.info["directions"]["seed"] == 5 and plane.info["directions"]["norm"] == "filter"


# --------------------------------------------------------------------------- loss-landscapes


def test_grid_equals_loss_landscapes_random_plane_fed_the_same_directions(conv, monkeypatch):
    """loss-landscapes' random_plane draws its own (uniform) directions: rand_u_like / orthogonal_to are made to
    return ours, with its normalisation off (ours is already applied; its filter rule would divide the zero bias
    directions by zero). It then rescales each to ‖θ‖ / (distance·steps) and walks the grid in place."""
    ll = pytest.importorskip("loss_landscapes")
    from loss_landscapes.metrics import Metric
    from loss_landscapes.model_interface.model_parameters import ModelParameters

    net, evals = conv
    weights = {n: p.detach().clone() for n, p in net.named_parameters()}
    chart = directions.draw_chart(weights, "ft", seed=1)
    u, v = (ModelParameters([d[n].clone() for n in weights]) for d in (chart.u, chart.v))
    monkeypatch.setattr(ll.main, "rand_u_like", lambda _: u)
    monkeypatch.setattr(ll.main, "orthogonal_to", lambda _: v)

    class MeanLoss(Metric):
        def __call__(self, wrapper) -> float:
            total = sum(F.cross_entropy(wrapper.forward(x), t, reduction="sum").item() for x, t in evals.batches)
            return total / evals.n

    wrapper = ll.GeneralModelWrapper(net, [net], lambda m, x: m(**x))
    steps, distance = 5, 2.0
    theirs = ll.random_plane(wrapper, MeanLoss(), distance=distance, steps=steps, normalization=None,
                             deepcopy_model=True)  # fmt: skip
    # Their point [i][j]: θ + (i − steps/2)·s1·δ + (j + 1 − i mod 2 − steps/2)·s2·η (columns walked up and down).
    norm = lambda d: math.sqrt(sum(float(t.double().square().sum()) for t in d.values()))  # noqa: E731
    s1, s2 = (norm(weights) / (distance * steps * norm(d)) for d in (chart.u, chart.v))
    points = [((i - steps / 2) * s1, (j + 1 - i % 2 - steps / 2) * s2) for i in range(steps) for j in range(steps)]
    ours = [r.loss for r in PlaneEvaluator(copy.deepcopy(net), chart, evals, "cpu").evaluate_iter(points)]
    np.testing.assert_allclose(np.array(ours).reshape(steps, steps), theirs, rtol=0, atol=1e-5)
    assert np.ptp(theirs) > 1e-2  # the surface is not flat: the comparison means something


# --------------------------------------------------------------------------- solutions of tiny-bert


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_entry):
    """tiny-bert, its ft / lora / randlora solutions (trainable tensors perturbed at random, saved and loaded back)
    and 23 texts as an evaluation set."""
    from adapters.solution import load_solution
    from tests.synthetic import save_perturbed_solutions

    out = tmp_path_factory.mktemp("directions")
    torch.manual_seed(0)
    base = tiny_entry.build(NUM_CLASSES)
    folders = save_perturbed_solutions(base, tiny_entry, out, NUM_CLASSES, 0.2)
    solutions = {method: load_solution(folder, base=base) for method, folder in folders.items()}
    texts = [f"sample {i} " + "word " * (i % 7) for i in range(23)]
    evals = EvalSet.prepare(tiny_entry.encode(texts), torch.arange(23) % NUM_CLASSES, 8, "cpu")
    return base, solutions, evals


def _config(**kw) -> run_config.RunConfig:
    return run_config.RunConfig(chart=kw.pop("chart", "random"), **kw)


@pytest.mark.parametrize("center", ["ft", "lora", "randlora"])
def test_grid_centre_equals_the_solutions_loss(tiny, center):
    base, solutions, evals = tiny
    sol = solutions[center]
    objective = OBJECTIVES["classification"]
    chart, evaluator = build.random_evaluator(_config(center=center), sol, center, evals, "cpu", "float32",
                                                  objective)  # fmt: skip
    assert type(evaluator) is PlaneEvaluator  # the plane's own engine: the same cost per point
    params = dict(base.named_parameters())
    assert set(chart.origin) == set(params)  # the directions span every parameter of the model
    assert all(chart.u[n].any() for n, p in params.items() if p.dim() > 1 and p.any())
    xs, ys = default_axes(chart, 3)
    assert xs.tolist() == [-1.0, 0.0, 1.0] and ys.tolist() == [-1.0, 0.0, 1.0]
    for n in (4, 11):  # [-1, 1] with the centre a grid point, also for an even count
        axis = default_axes(chart, n)[0]
        assert len(axis) == n and axis[0] == -1.0 and axis[-1] == 1.0 and 0.0 in axis and np.all(np.diff(axis) > 0)
    grid = run_grid(evaluator, xs, ys, progress=False)
    assert grid["loss"][1, 1] == pytest.approx(_loss(sol.model(), evals), abs=1e-6)
    # another grid point: the plain model with θ* + x·δ + y·η loaded, against the grid's value
    moved = copy.deepcopy(base)
    moved.load_state_dict({**moved.state_dict(), **chart.weights_at(1.0, -1.0)})
    assert grid["loss"][0, 2] == pytest.approx(_loss(moved, evals), abs=1e-6)
    assert abs(grid["loss"][0, 2] - grid["loss"][1, 1]) > 1e-3


@pytest.mark.parametrize("method", ["lora", "randlora"])
def test_adapter_coordinates_move_only_the_adapter_and_match_peft_merge(tiny, method):
    from peft import PeftModel

    from adapters.solution import peft_config_of

    base, solutions, evals = tiny
    sol = solutions[method]
    before_base = {n: p.detach().clone() for n, p in base.named_parameters()}
    ev = directions.AdapterEvaluator(sol, evals, "cpu", seed=2)
    chart = ev.chart
    names = set(chart.origin)
    kinds = ("lora_A", "lora_B") if method == "lora" else directions.LAYER_RULE
    assert any("task_head" in n for n in names) and all(any(k in n or "task_head" in n for k in kinds) for n in names)
    for n, w in chart.origin.items():  # λ / γ normalised as a layer; factor matrices and the head per row
        d = chart.u[n]
        if w.dim() <= 1:
            assert not d.any(), n
        elif method == "randlora" and "task_head" not in n:
            assert float(d.norm()) == pytest.approx(float(w.norm()), rel=1e-5), n
        else:
            torch.testing.assert_close(d.norm(dim=1), w.norm(dim=1), rtol=1e-5, atol=1e-6)
    assert ev.evaluate(0.0, 0.0).loss == pytest.approx(_loss(sol.model(), evals), abs=ADAPTER_TOL)
    frozen = {n: p.detach().clone() for n, p in ev.model.named_parameters() if n not in names}
    x, y = 0.6, -0.4
    loss = ev.evaluate(x, y).loss
    now = dict(ev.model.named_parameters())
    assert all(torch.equal(now[n], t) for n, t in frozen.items())  # only the adapter moved
    assert all(torch.equal(before_base[n], p) for n, p in base.named_parameters())  # the base model untouched
    reference = PeftModel.from_pretrained(copy.deepcopy(base), sol.path, config=peft_config_of(sol.path))
    ref_params = dict(reference.named_parameters())
    with torch.no_grad():
        for n in names:
            torch.testing.assert_close(now[n], chart.origin[n] + x * chart.u[n] + y * chart.v[n])
            ref_params[n].copy_(chart.origin[n] + x * chart.u[n] + y * chart.v[n])
    merged = reference.merge_and_unload()  # peft's own merge of the moved adapter into plain weights
    assert loss == pytest.approx(_loss(merged, evals), abs=ADAPTER_TOL)
    assert abs(loss - ev.evaluate(0.0, 0.0).loss) > 1e-4


def test_config_of_the_random_charts(tmp_path):
    from landscape.config import RANDOM_CHARTS as CONFIG_CHARTS

    assert CONFIG_CHARTS == RANDOM_CHARTS
    toml = tmp_path / "random.toml"
    toml.write_text('[landscape]\nchart = "random-line"\ncenter = "lora"\ndirection_seed = 3\n'
                    'direction_norm = "layer"\nignore = "none"\ncoordinates = "adapter"\n')  # fmt: skip
    cfg = run_config.from_argv(["--config", str(toml)])
    assert (cfg.chart, cfg.center, cfg.direction_seed, cfg.direction_norm, cfg.ignore, cfg.coordinates) == (
        "random-line", "lora", 3, "layer", "none", "adapter")  # fmt: skip
    assert build.direction_seed(run_config.from_argv(["--chart", "random", "--seed", "7"])) == 7
    bad = [  # the values as the command line gives them (argparse itself refuses a bad choice typed as a flag)
        ({"center": "lora"}, "--center lora applies to --chart random / random-line only: drop it"),
        ({"chart": "random", "coordinates": "adapter"}, "--coordinates adapter: adapter coordinates need an adapter"),
        ({"chart": "random", "direction_norm": "unit"}, "--direction-norm unit: not a valid choice"),
        ({"chart": "random", "direction_seed": -1}, "--direction-seed -1: must be an integer >= 0"),
        ({"chart": "random", "plane_storage": "factored"}, "random charts hold the dense plane"),
    ]
    for given, words in bad:
        with pytest.raises(UserError) as e:
            run_config.resolve(given)
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


# --------------------------------------------------------------------------- the command line


def _argv(root, out, *extra):
    return ["--dataset", "wordnet", "--data-root", str(root), "--model", "tiny-bert", "--train-steps", "2",
            "--grid", "3", "--eval-samples", "16", "--path-points", "0", "--train-per-class", "12",
            "--test-per-class", "4", "--no-progress", "--out", str(out), *extra]  # fmt: skip


def test_cli_random_plane_line_adapter_and_bad_center(wordnet_root, tmp_path, capsys):
    from landscape.run import open_run

    out = tmp_path / "run"
    assert connectivity.main(_argv(wordnet_root, out, "--chart", "random", "--center", "lora")) == 0
    for name in ("landscape.npz", "landscape.json", "landscape.png", "landscape.html"):
        assert (out / name).stat().st_size > 0, name
    plane = dict(np.load(out / "landscape.npz"))
    meta = json.loads((out / "landscape.json").read_text())
    assert plane["loss"].shape == (3, 3) and list(plane["point_names"]) == ["lora"]
    assert plane["points"].tolist() == [[0.0, 0.0]] and plane["x"].tolist() == [-1.0, 0.0, 1.0]
    info = meta["chart_geometry"]["directions"]
    assert (info["seed"], info["norm"], info["ignore"], info["coordinates"]) == (0, "filter", "biasbn", "weights")
    run = open_run(out)  # the run's own solution and evaluation set, rebuilt independently
    centre = _loss(run.solutions["lora"].model(), run.eval_set)
    assert plane["loss"][1, 1] == pytest.approx(centre, abs=1e-6)
    assert meta["solutions"]["lora"]["vertex_loss"] == pytest.approx(centre, abs=1e-6)

    # the same folder: solutions and spectrum reused, the grid of the other chart discarded (--restart)
    assert connectivity.main(_argv(wordnet_root, out, "--chart", "random-line", "--center", "lora", "--restart")) == 0
    line = np.load(out / "landscape.npz")
    assert line["y"].tolist() == [0.0] and line["loss"].shape == (1, 3)
    np.testing.assert_allclose(line["loss"][0], plane["loss"][1], rtol=0, atol=1e-9)  # the plane's row β = 0
    assert (out / "landscape.png").stat().st_size > 0 and (out / "landscape.html").stat().st_size > 0

    with nodraw.figures_not_drawn():  # its figures are not read (the two runs above check theirs)
        assert connectivity.main(_argv(wordnet_root, out, "--chart", "random", "--center", "lora", "--coordinates",
                                       "adapter", "--restart")) == 0  # fmt: skip
    adapter = np.load(out / "landscape.npz")
    assert adapter["loss"][1, 1] == pytest.approx(centre, abs=ADAPTER_TOL)  # same centre, other coordinates
    assert json.loads((out / "landscape.json").read_text())["chart_geometry"]["directions"]["coordinates"] == "adapter"

    capsys.readouterr()
    for extra, words in (((str(tmp_path / "nope"),), "neither ft, lora, randlora nor an existing solution folder"),
                         ((str(tmp_path),), "solution.json")):  # fmt: skip
        bad_out = tmp_path / f"bad{len(words)}"
        assert connectivity.main(_argv(wordnet_root, bad_out, "--chart", "random", "--center", *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()  # the error is the last line (the budget may precede it)
        assert err and words in err[-1] and "Traceback" not in "\n".join(err), err
        assert not bad_out.exists()
