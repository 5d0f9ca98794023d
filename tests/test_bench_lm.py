"""The LM throughput benchmark (``experiments.benchmarks.lm_throughput --quick``): its JSON carries the fields other
tools read, and both methods score the same: the toolkit's per-sample answer losses equal the plain transformers
loop's (:func:`experiments.benchmarks.plain_lm.plain_loop`) to 1e-5."""

from __future__ import annotations

import json

import pytest

from experiments.benchmarks import lm_throughput

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_quick_mode_json_and_agreement(tmp_path):
    out = tmp_path / "lm.json"
    assert lm_throughput.main(["--quick", "--samples", "5", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "lm_throughput" and "--quick" in report["command"]
    (case,) = report["cases"]
    for key in ("params", "tokens", "tokens_per_s", "plain_tokens_per_s", "ratio", "toolkit_seconds", "plain_seconds",
                "max_abs_loss_diff", "eval_tokens", "shape"):  # fmt: skip
        assert key in case, key
    assert case["samples"] == 5 and case["shape"]["num_hidden_layers"] == 2
    assert case["tokens"] == sum(len(p) + len(c) for p, cs in lm_throughput.fabricate_examples(5, 1000) for c in cs)
    assert case["max_abs_loss_diff"] <= 1e-5 and abs(case["toolkit_loss"] - case["plain_loss"]) <= 1e-5
    assert case["ratio"] == pytest.approx(case["tokens_per_s"] / case["plain_tokens_per_s"])
    assert report["machine"]["cpu_count"] >= 1


def test_qwen2_0_5b_shape_and_bad_layers(capsys):
    assert lm_throughput.QWEN2_0_5B["hidden_size"] == 896 and lm_throughput.QWEN2_0_5B["vocab_size"] == 151936
    assert lm_throughput.main(["--layers", "25"]) == 2
    assert "at most 24" in capsys.readouterr().err
