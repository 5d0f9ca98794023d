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
    assert "--batch-size" not in values  # the issue's smoke trains at the preset's batch, which the floor reads too
    from experiments.benchmarks import cifar_smoke_floor

    assert cifar_smoke.PRESET_BATCH == cifar_smoke_floor.BATCH == 128


def test_child_records_each_stage(tmp_path, monkeypatch):
    """The child wraps landscape.cli.Stages: each stage gets its wall, CPU and system seconds, its page faults and a
    peak RSS at least the memory a stage allocated (a stand-in for connectivity.main that holds 200 MB in one stage)."""
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
    assert all(s["seconds"] >= 0 and s["cpu_s"] >= 0 and s["system_s"] >= 0 for s in got["stages"].values())
    # touching 200 MB of fresh memory faults its pages in (≥ 100 even as 2 MB huge pages); an empty stage next to none
    assert got["stages"]["big"]["minor_faults"] >= 100 > got["stages"]["small"]["minor_faults"]


def test_table_names_cpu_and_budget():
    stages = {"load": {"seconds": 3.0, "cpu_s": 5.0, "peak_rss_bytes": 2e9}}
    result = {"cpu": "Some CPU (AVX2), 2 cores", "threads": 2, "dtype": "float32", "command": "python -m x",
              "load_average_1min": [1.0, 2.0], "stages": stages, "wall_s": 290.0, "cli_cpu_s": 500.0,
              "peak_rss_bytes": 2e9, "budget_s": 300.0, "within_budget": True}  # fmt: skip
    text = cifar_smoke.table(result)
    assert "Some CPU (AVX2), 2 cores" in text and "within" in text and "load" in text
    assert "training batch 128 (the issue's)" in text
    assert "training batch 32 (smaller than the issue's 128)" in cifar_smoke.table({**result, "batch_size": 32})
    assert "AVX2" in cifar_smoke.cpu_name() or "cores" in cifar_smoke.cpu_name()


def _structural_flops(model, n: int, train: bool) -> tuple[int, int]:
    """(forward matmul FLOPs, the patch convolution's share) of ``model`` on ``n`` images and its class prompts,
    counted from the modules: hooks on every Linear, MultiheadAttention (q, k, v in, out) and Conv2d, plus the two
    projections and the logits, which are plain matmuls."""
    import torch
    from torch import nn

    counted, conv = [], []

    def hook(module, inputs, output):
        if isinstance(module, nn.Linear):
            counted.append(2 * inputs[0].numel() * module.out_features)
        elif isinstance(module, nn.MultiheadAttention):
            q, k, v = inputs[:3]
            counted.append(2 * module.embed_dim * (2 * q.numel() + k.numel() + v.numel()))
        else:
            conv.append(2 * output.numel() * module.weight[0].numel())

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Linear, nn.MultiheadAttention, nn.Conv2d))]  # fmt: skip
    model.train(train)
    model._text_cache = None
    with torch.set_grad_enabled(train):
        model(pixels=torch.zeros(n, 3, 32, 32, dtype=torch.uint8))
    for h in handles:
        h.remove()
    inner, classes = model.clip, model.num_classes
    plain = 2 * n * inner.visual.proj.numel() + 2 * classes * inner.text_projection.numel()
    plain += 2 * n * inner.text_projection.shape[1] * classes  # the logits
    return sum(counted) + sum(conv) + plain, sum(conv)


def test_floor_counts_every_matmul_of_an_evaluation_and_a_training_step():
    """The floor's matmul FLOPs (recorded at the dispatcher) equal a count from the model's structure, for an
    evaluation on clip-tiny (nn.MultiheadAttention's fused inference kernel included) and for a full fine-tuning
    step: 3× its forward's (each product's input and weight gradients), less the patch convolution's input
    gradient (pixels need none)."""
    import torch

    from adapters.models import clip
    from experiments.benchmarks import cifar_smoke_floor as floor

    classes = ["apple", "aquarium fish", "bicycle", "maple tree"]
    batch = 24  # not the preset's: the step is counted at the batch asked for
    parts = floor.pieces("clip-tiny", classes, batch=batch)
    recorded = {name: sum(k * floor.flops(key) for key, k in calls.items()) for name, (_, calls) in parts.items()}
    torch.manual_seed(0)
    model = clip.build(len(classes), classes, arch="clip-tiny", pretrained="none")
    assert parts[f"point ({floor.SAMPLES} samples)"][0] == floor.POINTS == 69
    assert recorded[f"point ({floor.SAMPLES} samples)"] == _structural_flops(model, floor.SAMPLES, train=False)[0]
    forward, conv = _structural_flops(model, batch, train=True)
    assert parts["train step ft"][0] == floor.STEPS
    assert recorded["train step ft"] == 3 * forward - conv


def test_floor_refuses_a_batch_other_than_its_smokes(tmp_path, capsys):
    """The floor stands beside a smoke at that smoke's batch: another one is refused before any work (exit 2)."""
    from experiments.benchmarks import cifar_smoke_floor as floor

    smoke = tmp_path / "smoke.json"
    smoke.write_text(json.dumps({"batch_size": 128, "stages": {}, "wall_s": 1.0}))
    assert floor.main(["--smoke", str(smoke), "--batch-size", "32"]) == 2
    assert "--smoke run's (128)" in capsys.readouterr().err
