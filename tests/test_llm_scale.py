"""experiments.benchmarks.llm_scale --quick on tiny sizes: the JSON other tools read (names and types), finite
ratios, evaluation throughput beside the plain loop's, and a projection labelled as one."""

from __future__ import annotations

import json
import math
from pathlib import Path

from experiments.benchmarks import llm_scale

CASE_KEYS = ("params", "model_bytes", "peak_rss_above_base_bytes", "ratio", "activation_bytes", "seconds")


def test_quick_run_writes_the_documented_json(tmp_path: Path, capsys):
    out = tmp_path / "llm_scale.json"
    assert llm_scale.main(["--quick", "--sizes", "64", "96", "--stages", "load", "plane", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "projection" in printed
    result = json.loads(out.read_text())
    cases = result["cases"]
    assert [(c["hidden"], c["stage"]) for c in cases] == [(64, "load"), (64, "plane"), (96, "load"), (96, "plane")]
    for c in cases:
        assert "error" not in c, c
        for key in CASE_KEYS:
            assert key in c, key
        assert c["model_bytes"] > 0 and c["params"] > 0
        assert math.isfinite(c["ratio"]) and c["ratio"] >= 0
        if c["stage"] == "plane":
            assert c["tokens_per_s"] > 0 and c["plain_tokens_per_s"] > 0 and c["activation_bytes"] is not None
    assert cases[0]["params"] < cases[2]["params"]  # the sizes differ
    stages = {p["stage"] for p in result["projection"]}
    assert {"load", "plane"} <= stages
    for p in result["projection"]:
        assert p["projected_peak_bytes"] > 0 and isinstance(p["fits"], bool) and "projection" in p["label"]
    assert result["cpu"] and result["real_configs"]["qwen2-0.5b"]["hidden_size"] == 896


def _case(hidden: int, stage: str, ratio: float, **extra) -> dict:
    return {"model": "qwen2-0.5b", "hidden": hidden, "dtype": "bfloat16", "source": "own", "stage": stage,
            "params": hidden * 1000, "layers": 4, "model_bytes": hidden * 2000, "held_bytes": hidden * 2000,
            "peak_rss_above_base_bytes": int(ratio * hidden * 2000), "ratio": ratio, "activation_bytes": 0,
            "seconds": 1.0, **extra}  # fmt: skip


def test_merge_lets_a_rerun_replace_its_rows(tmp_path: Path):
    old = {"cpu": "x", "cases": [_case(64, "load", 3.0), _case(64, "plane", 2.0)]}
    new = {"cpu": "x", "cases": [_case(64, "load", 1.2)]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    result = llm_scale.merged([tmp_path / "old.json", tmp_path / "new.json"])
    by_stage = {c["stage"]: c for c in result["cases"]}
    assert len(result["cases"]) == 2
    assert by_stage["load"]["ratio"] == 1.2 and by_stage["load"]["rerun"] is True
    assert by_stage["plane"]["ratio"] == 2.0 and "rerun" not in by_stage["plane"]


def test_the_load_projection_holds_at_least_the_model():
    # an fp32 load maps the file: its measured peak is below the model's bytes, the projection is not
    (p,) = [p for p in llm_scale.project([_case(64, "load", 0.05)]) if p["stage"] == "load"]
    assert p["projected_peak_bytes"] >= p["base_bytes_8b"] and p["label"] == "projection"
