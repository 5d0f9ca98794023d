"""The barrier of a path is its height above the chord between the endpoint losses (Entezari et al. 2022), and
Frankle et al.'s max L(t) − mean(L(0), L(1)) is reported apart as the peak above the endpoint mean: synthetic
paths whose answers are known in closed form, "no barrier" for a path at or below its chord, in the printed
text and in the figure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from landscape import paths, render

T = np.linspace(-0.25, 1.25, 25)  # step 1/16: 0, 1/4, 1/2 and 1 are on the axis; the ends outside do not count


def _chord(t: np.ndarray, l0: float, l1: float) -> np.ndarray:
    return (1.0 - t) * l0 + t * l1


def test_a_bump_on_a_sloped_chord_gives_its_height():
    """L(t) = chord + h·sin(πt): the barrier is h at t = 1/2, whatever the slope; the peak above the endpoint
    mean is max over the grid of chord + bump − (L0 + L1)/2, a different number on a sloped chord."""
    l0, l1, h = 0.4, 0.9, 0.2
    loss = _chord(T, l0, l1) + h * np.sin(np.pi * T)
    b = paths.loss_barrier(T, loss)
    assert b["barrier"] == pytest.approx(h, abs=1e-12) and b["t_max"] == 0.5
    assert b["loss_max"] == pytest.approx(0.5 * (l0 + l1) + h, abs=1e-12)
    # the continuous maximum of l0 + Δ·t + h·sin(πt) is at cos(πt*) = −Δ / (πh); the grid's is within one step
    delta = l1 - l0
    ts = math.acos(-delta / (math.pi * h)) / math.pi
    peak = l0 + delta * ts + h * math.sin(math.pi * ts) - 0.5 * (l0 + l1)
    inside = (T >= 0) & (T <= 1)
    assert b["peak_above_endpoint_mean"] == pytest.approx(loss[inside].max() - 0.5 * (l0 + l1), abs=1e-12)
    assert b["peak_above_endpoint_mean"] == pytest.approx(peak, abs=2e-3) and abs(b["peak_t"] - ts) <= 1 / 32
    assert peak > h + 0.06  # Frankle's quantity adds part of the slope: not the bump's height
    assert paths.has_barrier(b["barrier"]) and paths.barrier_text({**b, "barrier_se": 0.01}) == (
        "barrier 0.2000 ± 0.0100 at t = 0.500"
    )
    # the same bump on a flat chord: both quantities are h
    flat = paths.loss_barrier(T, 0.7 + h * np.sin(np.pi * T))
    assert flat["barrier"] == pytest.approx(h) and flat["peak_above_endpoint_mean"] == pytest.approx(h)


def test_a_convex_path_has_no_barrier():
    loss = 0.2 + 2.0 * (T - 0.3) ** 2  # convex: below its chord everywhere inside
    b = paths.loss_barrier(T, loss)
    assert b["barrier"] == 0.0 and b["chord_barrier"] == 0.0 and b["t_max"] in (0.0, 1.0)
    assert not paths.has_barrier(b["barrier"]) and paths.barrier_text(b) == "no barrier"
    # its paired SE is exactly 0: the chord meets the path at the end where the maximum is
    samples = [torch.tensor(v + np.linspace(-1.0, 1.0, 7)) for v in loss]
    assert paths.barriers_with_se(T, loss, samples)["barrier_se"] == 0.0


def test_a_monotone_path_has_no_barrier_but_half_the_gap_above_the_endpoint_mean():
    l0, l1 = 0.3, 1.1
    for loss in (_chord(T, l0, l1), l0 + (l1 - l0) * np.clip(T, 0, None) ** 2):  # straight and convex
        b = paths.loss_barrier(T, loss)
        assert b["peak_above_endpoint_mean"] == pytest.approx((l1 - l0) / 2, abs=1e-12) and b["peak_t"] == 1.0
        assert abs(b["barrier"]) < paths.NO_BARRIER_ATOL and paths.barrier_text(b) == "no barrier"
    # a monotone but concave path rises above its chord: sqrt(t) − t is largest, 1/4, at t = 1/4
    concave = paths.loss_barrier(T, l0 + (l1 - l0) * np.sqrt(np.clip(T, 0, None)))
    assert concave["barrier"] == pytest.approx((l1 - l0) / 4, abs=1e-12) and concave["t_max"] == 0.25


def test_figures_say_no_barrier_and_never_call_the_peak_a_barrier():
    l0, l1, h = 0.4, 1.4, 0.3
    losses = {"curve": 0.4 + 2.0 * (T - 0.3) ** 2, "line": _chord(T, l0, l1) + h * np.sin(np.pi * T)}
    inside = (T >= 0) & (T <= 1)
    t, loss = T[inside], np.array([v[inside] for v in losses.values()])
    result = {"t": t, "loss": loss, "paths": list(losses), "pair": "ft-lora", "kind": "bezier", "bends": 1,
              "barriers": {row: paths.loss_barrier(t, loss[k]) for k, row in enumerate(losses)}}  # fmt: skip
    (ax,) = render.curve_figure(result).axes
    legend = [x.get_text() for x in ax.get_legend().get_texts()]
    assert legend[0].endswith("(no barrier)") and legend[1].endswith("(barrier 0.3)")
    assert not any("mean endpoint" in text or "endpoint mean" in text for text in legend)
    # one arrow, from the line's chord at t = 1/2 up to its bump
    arrows = [(a.xy, a.xyann) for a in ax.texts if hasattr(a, "xyann")]
    assert arrows == [((0.5, pytest.approx(0.9 + h)), (0.5, pytest.approx(0.9)))]


def test_the_gallery_redoes_barriers_of_the_old_format(tmp_path):
    """experiments.figures reruns what holds format-1 barriers (Frankle's quantity called the barrier)."""
    import json

    from experiments.figures import _old_barriers

    cases = {
        "old.json": ({"paths": {"barrier": {"ft-lora": 0.02}}}, True),
        "new.json": ({"paths": {"barrier": {"ft-lora": 0.0}, "format_version": paths.FORMAT_VERSION}}, False),
        "none.json": ({"paths": None}, False),  # a random chart: no paths, nothing to redo
    }
    for name, (content, old) in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        assert _old_barriers(tmp_path / name, "paths") is old, name
    (tmp_path / "curve.json").write_text(json.dumps({"curve": {"barrier": 0.01}, "line": {"barrier": 0.02}}))
    assert _old_barriers(tmp_path / "curve.json")
    (tmp_path / "curve.json").write_text(json.dumps({"format_version": 2, "curve": {}, "line": {}}))
    assert not _old_barriers(tmp_path / "curve.json")


def test_the_runs_closing_summary_prints_each_barrier(capsys):
    from landscape import report

    result = {"pairs": ["ft-lora", "lora-randlora"], "points": len(T), "extend": 0.25, "barriers": {}}
    for pair, loss in zip(result["pairs"], (_chord(T, 0.4, 0.9) + 0.2 * np.sin(np.pi * T), 0.2 + (T - 0.3) ** 2),
                          strict=True):  # fmt: skip
        result["barriers"][pair] = {**paths.loss_barrier(T, loss), "barrier_se": 0.01,
                                    "peak_above_endpoint_mean_se": 0.02}  # fmt: skip
    report.print_summary([], {}, {"paths": 1.0}, paths.summary(result))
    out = capsys.readouterr().out.splitlines()
    peak = f"peak above the endpoint mean {result['barriers']['ft-lora']['peak_above_endpoint_mean']:.4f} ± 0.0200"
    assert out[-2] == f"path ft-lora        barrier 0.2000 ± 0.0100 at t = 0.500; {peak}"
    assert out[-1].startswith("path lora-randlora  no barrier; peak above the endpoint mean ")
