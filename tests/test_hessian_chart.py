"""The Hessian eigen-direction chart (``--chart hessian``): its axes against the top-2 eigenvectors of the dense
Hessian of a tiny model (numpy.linalg.eigh), the loss's second difference along each axis against its eigenvalue
(float64, a tight tolerance), and the command line end to end (landscape.json's ``chart`` and
``chart_eigenvalues``, the printed check, one-line errors before any work)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adapters.errors import UserError
from adapters.objectives import OBJECTIVES
from landscape import config as run_config
from landscape import connectivity, curvature
from landscape.engine import hessian_chart
from tests import nodraw
from tests.test_curvature import TinyNet, exact_hessian
from tests.test_directions import _argv

CE = OBJECTIVES["classification"]


@pytest.fixture(scope="module")
def tiny():
    """TinyNet (264 parameters), 30 samples in two batches, its float64 operator and dense Hessian."""
    from landscape.engine.grid import EvalSet

    torch.manual_seed(0)
    model = TinyNet()
    x, y = torch.randn(30, 8), torch.randint(0, 4, (30,))
    eval_set = EvalSet([({"x": x[:11]}, y[:11]), ({"x": x[11:]}, y[11:])], 30)
    names = [n for n, _ in model.named_parameters()]
    loss = lambda m, p: F.cross_entropy(torch.func.functional_call(m, p, (x.double(),)), y)  # noqa: E731
    exact = exact_hessian(model, names, loss)
    op = curvature.HessianOperator(copy.deepcopy(model), names, eval_set, CE, "float64")
    return model, x, y, names, exact, op


def test_axes_are_the_top_two_eigenvectors_of_the_dense_hessian(tiny):
    _, _, _, _, exact, op = tiny
    values, vectors, info = hessian_chart.top_eigenpairs(op.flat_hvp, op.dim, op.device, op.dtype, seed=3)
    w, q = np.linalg.eigh(0.5 * (exact + exact.T))
    assert info["converged"] and info["steps"] < op.dim  # stopped by the residual test, not a full basis
    np.testing.assert_allclose(values, w[::-1][:2], rtol=1e-8)
    assert values[0] > values[1] > 0
    for k in range(2):  # unit norm, and equal to eigh's eigenvector up to sign
        top = q[:, -1 - k]
        assert np.linalg.norm(vectors[k]) == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(vectors[k] * np.sign(vectors[k] @ top), top, atol=1e-6)
    assert abs(vectors[0] @ vectors[1]) < 1e-10


def test_second_difference_along_each_axis_equals_its_eigenvalue(tiny):
    model, x, y, names, exact, op = tiny
    values, vectors, info = hessian_chart.top_eigenpairs(op.flat_hvp, op.dim, op.device, op.dtype)
    center = {n: p.detach().double() for n, p in model.named_parameters()}
    chart = hessian_chart.hessian_chart(center, values, vectors, "ft", info)
    assert chart.name == "hessian" and chart.vertices == {"ft": (0.0, 0.0)}
    assert chart.info["hessian"]["eigenvalues"] == [float(v) for v in values]
    flat = lambda d: torch.cat([d[n].reshape(-1).double() for n in names]).numpy()  # noqa: E731
    np.testing.assert_allclose(flat(chart.u), vectors[0], atol=1e-7)  # the axes are stored in fp32
    model64 = copy.deepcopy(model).double()
    u = {n: torch.from_numpy(vectors[0][a:b]).view(center[n].shape) for n, a, b in _spans(center)}
    v = {n: torch.from_numpy(vectors[1][a:b]).view(center[n].shape) for n, a, b in _spans(center)}

    def loss(px: float, py: float) -> float:  # float64, independent of the chart's fp32 copy
        params = {n: center[n] + px * u[n] + py * v[n] for n in center}
        return float(F.cross_entropy(torch.func.functional_call(model64, params, (x.double(),)), y))

    alpha = hessian_chart.half_width(values[0])
    assert 0.5 * values[0] * alpha**2 == pytest.approx(hessian_chart.DEFAULT_RISE)
    check = hessian_chart.second_differences(loss, values, 1e-3)
    assert check["step"] == 1e-3 and [a["axis"] for a in check["axes"]] == ["x", "y"]
    for a, lam in zip(check["axes"], values, strict=True):
        assert a["second_difference"] == pytest.approx(lam, rel=1e-5)  # O(h²) + rounding ε·L/h²
        assert a["relative_difference"] < 1e-5
    # a wrong axis fails it: the second difference along a random unit vector is far from λ₁
    r = np.random.default_rng(0).standard_normal(op.dim)
    r /= np.linalg.norm(r)
    assert abs(r @ exact @ r - values[0]) > 0.1 * values[0]
    assert "rel. diff." in hessian_chart.check_line(check)


def _spans(center):
    lo = 0
    for n, t in center.items():
        yield n, lo, lo + t.numel()
        lo += t.numel()


def test_no_positive_curvature_is_refused():
    with pytest.raises(UserError, match="not positive"):
        hessian_chart.half_width(-0.5)


def test_config_of_the_hessian_chart():
    cfg = run_config.resolve({"chart": "hessian", "center": "lora", "coordinates": "adapter"})
    assert (cfg.chart, cfg.center, cfg.coordinates) == ("hessian", "lora", "adapter")
    bad = [
        ({"chart": "hessian", "coordinates": "adapter"}, "adapter coordinates need an adapter centre"),
        ({"chart": "hessian", "direction_seed": 3}, "do not apply to --chart hessian"),
        ({"chart": "hessian", "center": "lora", "load_4bit": True, "methods": ["lora"]}, "4-bit base keeps packed"),
        ({"chart": "hessian", "plane_storage": "factored"}, "hessian chart holds the dense plane"),
        ({"chart": "hessian", "center": "ft", "methods": ["lora"]}, "--center ft: is not among the solutions"),
    ]
    for given, words in bad:
        with pytest.raises(UserError) as e:
            run_config.resolve(given)
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_cli_hessian_chart(wordnet_root, tmp_path, capsys):
    out = tmp_path / "run"
    with nodraw.figures_not_drawn():
        assert connectivity.main(_argv(wordnet_root, out, "--chart", "hessian", "--center", "lora")) == 0
    printed = capsys.readouterr().out
    assert "hessian chart check, h = " in printed and "rel. diff." in printed
    meta = json.loads((out / "landscape.json").read_text())
    plane = dict(np.load(out / "landscape.npz"))
    assert meta["chart"] == "hessian" and list(plane["point_names"]) == ["lora"]
    lam = meta["chart_eigenvalues"]
    assert len(lam) == 2 and lam[0] >= lam[1] and lam[0] > 0
    info = meta["chart_geometry"]["hessian"]
    assert info["eigenvalues"] == lam and info["coordinates"] == "weights" and info["converged"]
    alpha = info["half_width"]
    assert 0.5 * lam[0] * alpha**2 == pytest.approx(info["rise"])
    assert plane["x"].tolist() == pytest.approx([-alpha, 0.0, alpha]) and plane["y"].tolist() == plane["x"].tolist()
    check = meta["chart_check"]
    assert check["step"] == pytest.approx(alpha / hessian_chart.STEP_FRACTION)
    for a, value in zip(check["axes"], lam, strict=True):
        assert a["eigenvalue"] == value and a["relative_difference"] < 0.05, check  # fp32 loss, h = α/10
    assert plane["loss"][1, 1] == pytest.approx(check["loss_at_center"], abs=1e-6)

    for extra, words in ((("--center", "ft", "--coordinates", "adapter"), "adapter coordinates need an adapter"),
                         (("--center", "lora", "--load-4bit", "--methods", "lora"), "4-bit base keeps packed"),
                         (("--methods", "lora"), "--center ft (the default): is not among the solutions")):  # fmt: skip
        bad_out = tmp_path / f"bad{len(words)}"
        assert connectivity.main(_argv(wordnet_root, bad_out, "--chart", "hessian", *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err and words in err[-1] and "Traceback" not in "\n".join(err), err
        assert not bad_out.exists()
