"""experiments.benchmarks.paths_on_plane: both sides run on one reopened run, alternating, and agree on the paths
to fp32 rounding; a folder that is not a run is refused before any work."""

from __future__ import annotations

import json

from experiments.benchmarks import paths_on_plane


def test_both_sides_measure_the_same_paths(tiny_wordnet_run, tmp_path, capsys):
    out = tmp_path / "ab.json"
    argv = ["--run", str(tiny_wordnet_run), "--points", "3", "--repeats", "2", "--threads", "1", "--json", str(out)]
    assert paths_on_plane.main(argv) == 0
    got = json.loads(out.read_text())
    assert set(got["sides"]) == set(paths_on_plane.SIDES)
    assert all(len(runs) == 2 and all(r["seconds"] > 0 for r in runs) for runs in got["sides"].values())
    assert got["max_rel_loss_difference"] < 1e-5  # the plane's point is the line's point to fp32 rounding
    assert "median ratio own lines / on the plane" in capsys.readouterr().out


def test_not_a_run_is_refused(tmp_path, capsys):
    assert paths_on_plane.main(["--run", str(tmp_path)]) == 2
    assert "no landscape.json" in capsys.readouterr().err
