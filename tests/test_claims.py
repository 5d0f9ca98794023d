"""The paper's claims table (experiments.claims, issue 22 point 5): the verdict rule on constructed intervals, and
the table of a tiny ``--seeds 3`` run against scipy's t-interval of the per-seed values read from landscape.json,
numpy's rank tolerance on the spectrum's singular values and LoRA's closed-form parameter count."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from experiments import claims
from tests.conftest import SEEDS_N as N
from tests.conftest import scipy_interval


@pytest.mark.parametrize(
    ("ci", "direction", "expected"),
    [
        ([-0.30, -0.10], -1, claims.AGREES),  # claimed below 0, interval below 0
        ([0.10, 0.30], -1, claims.DISAGREES),  # claimed below 0, interval above 0
        ([-0.10, 0.20], -1, claims.NOISE),  # holds 0
        ([-0.20, 0.0], -1, claims.NOISE),  # touches 0: does not exclude it
        ([0.10, 0.30], 1, claims.AGREES),
        ([-0.30, -0.10], 1, claims.DISAGREES),
        ([-0.01, 0.01], 1, claims.NOISE),
        (None, 1, claims.NO_INTERVAL),  # one seed
    ],
)
def test_verdict_on_constructed_intervals(ci, direction, expected):
    assert claims.verdict(ci, direction) == expected


def test_a_claim_of_two_orderings_and_a_bad_direction():
    assert claims.combined([claims.AGREES, claims.AGREES]) == claims.AGREES
    assert claims.combined([claims.AGREES, claims.NOISE]) == claims.NOISE
    assert claims.combined([claims.NOISE, claims.DISAGREES]) == claims.DISAGREES
    with pytest.raises(ValueError, match="direction"):
        claims.verdict([0.1, 0.2], 0)


def test_ordering_verdicts_on_constructed_runs():
    """Per-seed vertex losses built so that FT is deeper on every seed by ~0.2, and RandLoRA vs LoRA reverses."""
    meta = {"solutions": {"ft": {"vertex_loss_per_seed": [1.0, 1.1, 0.95]},
                          "lora": {"vertex_loss_per_seed": [1.2, 1.31, 1.14]},
                          "randlora": {"vertex_loss_per_seed": [1.3, 1.0, 1.2]}}}  # fmt: skip
    o = claims.ordering(meta, "ft", "lora", -1)
    assert o["ci95"] == pytest.approx(scipy_interval([-0.2, -0.21, -0.19]), rel=1e-9)
    assert o["verdict"] == claims.AGREES
    assert claims.ordering(meta, "lora", "ft", -1)["verdict"] == claims.DISAGREES
    assert claims.ordering(meta, "randlora", "lora", -1)["verdict"] == claims.NOISE


def _expected(ci, direction):
    """The verdict rule restated on a scipy interval (independent of claims.verdict)."""
    low, high = ci
    below, above = high < 0, low > 0
    return (
        claims.AGREES
        if (below and direction < 0) or (above and direction > 0)
        else claims.DISAGREES
        if below or above
        else claims.NOISE
    )


def test_table_of_a_tiny_seeds_run_is_scipys_interval(seeds_run):
    meta = json.loads((seeds_run / "landscape.json").read_text())
    spec = json.loads((seeds_run / "spectrum.json").read_text())
    vertex = {m: meta["solutions"][m]["vertex_loss_per_seed"] for m in ("ft", "lora", "randlora")}
    assert all(len(v) == N for v in vertex.values())
    rows = {r["claim"]: r for r in claims.claims(meta, spec)}
    for name, pairs, direction in claims.ORDER_CLAIMS:
        row = rows[name]
        assert [o["pair"] for o in row["orderings"]] == list(pairs)
        for o, (a, b) in zip(row["orderings"], pairs, strict=True):
            diff = np.subtract(vertex[a], vertex[b])
            ci = scipy_interval(diff)
            assert o["per_seed"] == pytest.approx(diff.tolist(), abs=1e-15)
            assert o["mean"] == pytest.approx(diff.mean(), abs=1e-15)
            assert o["ci95"] == pytest.approx(ci, rel=1e-9)
            assert o["verdict"] == _expected(ci, direction)
    # the budget the RandLoRA-vs-LoRA claim rests on: LoRA's count in closed form, r·(out + in) per adapted layer
    b = rows["RandLoRA deeper than LoRA at an equal parameter count"]["budget"]
    shapes = [layer["shape"] for layer in spec["layers"]]
    assert b["lora"] == sum(meta["solutions"]["lora"]["rank"] * (o + i) for o, i in shapes)
    assert b["randlora"] == meta["solutions"]["randlora"]["adapter_params"]
    # the rank claim: numpy.linalg.matrix_rank's default tolerance (float32) on the stored singular values
    rank = rows[claims.RANK_CLAIM]["rank"]
    for layer, r in zip(spec["layers"], rank["ranks"], strict=True):
        s = np.asarray(layer["randlora"]["singular_values"], dtype=np.float64)
        assert r == int(np.sum(s > s.max() * max(layer["shape"]) * np.finfo(np.float32).eps))
    full = all(r == min(layer["shape"]) for r, layer in zip(rank["ranks"], spec["layers"], strict=True))
    assert rows[claims.RANK_CLAIM]["verdict"] == (claims.AGREES if full else claims.DISAGREES)


def test_figures_writes_the_claims_table_with_its_wall_time(seeds_run, tmp_path):
    from experiments import figures

    runs = tmp_path / "runs"
    shutil.copytree(seeds_run, runs / "wordnet")
    readme, page, gallery = tmp_path / "README.md", tmp_path / "claims.md", tmp_path / "gallery.md"
    readme.write_text(f"# x\n{claims.START}\nold claims\n{claims.END}\nend\n")
    page.write_text(f"# claims\n{claims.START}\nold claims\n{claims.END}\nafter\n")
    gallery.write_text(f"# g\n{figures.START}\nold\n{figures.END}\nend\n")
    argv = ["--only", "wordnet", "--runs", str(runs), "--figures", str(tmp_path / "fig"), "--readme", str(readme),
            "--claims-page", str(page), "--gallery", str(gallery), "--budget-minutes", "30"]  # fmt: skip
    assert figures.main(argv) == 0  # a run of other settings than the set's: read as it is, not made again
    text = readme.read_text()
    assert "old" not in text and text.endswith("end\n") and "old" not in gallery.read_text()
    table = text.split(claims.START)[1].split(claims.END)[0]
    assert page.read_text() == f"# claims\n{claims.START}{table}{claims.END}\nafter\n"  # the same table in the docs
    meta = json.loads((seeds_run / "landscape.json").read_text())
    diff = np.subtract(
        meta["solutions"]["ft"]["vertex_loss_per_seed"], meta["solutions"]["lora"]["vertex_loss_per_seed"]
    )
    low, high = scipy_interval(diff)
    assert f"L(FT) − L(LoRA) = {diff.mean():+.4f} [{low:+.4f}, {high:+.4f}]" in table
    assert "within its budget of 30 min" in table and "training seeds 0–2" in table
    assert "Not measured yet: fashion-mnist" in table  # the set's other task has no run here: said, not hidden
    assert table.count("| minilm on wordnet |") + table.count("| tiny-bert on wordnet |") == 4  # four claims


def test_a_set_run_with_other_seeds_is_made_again(tmp_path):
    from experiments import figures

    out = tmp_path / "wordnet"
    out.mkdir()
    command = "python -m landscape.connectivity --dataset wordnet --out runs/wordnet --no-progress"
    (out / "landscape.json").write_text(json.dumps({"command": command, "seed": 0, "solutions": {"ft": {}}}))
    assert figures.set_argv("wordnet", 3) == ["--dataset", "wordnet", "--seeds", "3"]
    assert figures.set_argv("wordnet-hf", 3)[-2:] != ["--seeds", "3"]  # the compared run: one seed
    assert figures._other_seeds(out, ["--dataset", "wordnet", "--seeds", "3"])
    assert not figures._other_seeds(out, ["--dataset", "wordnet"])
    seeded = {
        "command": command.replace("--out", "--seeds 3 --out"),
        "seed": 0,
        "solutions": {"ft": {"seeds": [0, 1, 2]}},
    }
    (out / "landscape.json").write_text(json.dumps(seeded))
    assert not figures._other_seeds(out, ["--dataset", "wordnet", "--seeds", "3"])
    assert figures._other_seeds(out, ["--dataset", "wordnet", "--seeds", "5"])
    assert not figures._other_seeds(out, ["--dataset", "fashion-mnist", "--seeds", "5"])  # another run: kept


def test_bad_seeds_or_budget_is_one_line_exit_2(capsys):
    from experiments import figures

    assert figures.main(["--seeds", "0"]) == 2
    err = capsys.readouterr().err
    assert "--seeds" in err and "Traceback" not in err
