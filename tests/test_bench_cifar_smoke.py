"""experiments.benchmarks.cifar_smoke: the command it runs is the issue's smoke run, its per-stage accounting (a
stage's peak RSS and CPU time, measured in the stage's own process) and its table."""

from __future__ import annotations

import json

from experiments.benchmarks import cifar_smoke


def test_the_smoke_arguments_are_the_issues():
    args = list(cifar_smoke.RUN_ARGS)
    values = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
    assert values["--dataset"] == "cifar100" and values["--train-steps"] == "2" and values["--grid"] == "3"
    assert values["--eval-samples"] == "16" and values["--path-points"] == "21"


def test_child_records_each_stage(tmp_path, monkeypatch):
    """The child wraps landscape.cli.Stages: each stage gets its wall and CPU seconds and a peak RSS at least the
    memory a stage allocated (a stand-in for connectivity.main that holds 200 MB in one stage)."""
    import numpy as np

    from landscape import cli, connectivity

    def fake_main(argv):
        stages = cli.Stages(quiet=True)
        with stages("small"):
            pass
        with stages("big"):
            block = np.ones(200 * 2**20 // 8)
            assert block.sum() > 0
        return 0

    monkeypatch.setattr(connectivity, "main", fake_main)
    report = tmp_path / "child.json"
    assert cifar_smoke.child(["--dataset", "cifar100"], report) == 0
    got = json.loads(report.read_text())
    assert set(got["stages"]) == {"small", "big"} and got["code"] == 0
    assert got["stages"]["big"]["peak_rss_bytes"] >= 200 * 2**20
    assert all(s["seconds"] >= 0 and s["cpu_s"] >= 0 for s in got["stages"].values())


def test_table_names_cpu_and_budget():
    stages = {"load": {"seconds": 3.0, "cpu_s": 5.0, "peak_rss_bytes": 2e9}}
    result = {"cpu": "Some CPU (AVX2), 2 cores", "threads": 2, "dtype": "float32", "command": "python -m x",
              "load_average_1min": [1.0, 2.0], "stages": stages, "wall_s": 290.0, "cli_cpu_s": 500.0,
              "peak_rss_bytes": 2e9, "budget_s": 300.0, "within_budget": True}  # fmt: skip
    text = cifar_smoke.table(result)
    assert "Some CPU (AVX2), 2 cores" in text and "within" in text and "load" in text
    assert "AVX2" in cifar_smoke.cpu_name() or "cores" in cifar_smoke.cpu_name()
