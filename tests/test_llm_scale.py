"""experiments.benchmarks.llm_scale --quick on tiny sizes: the JSON other tools read (names and types), finite
ratios, evaluation throughput beside the plain loop's, and a projection labelled as one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(
    "stage, glibc, user, mmap, switch",
    [("train_lora", False, None, "65536", "0"), ("train_ft", False, None, "1048576", None),
     ("plane", False, None, "1048576", "0"), ("train_lora", True, None, None, None),
     ("train_randlora", False, "1", "65536", "1")],
)  # fmt: skip
def test_cases_run_without_the_heap_policy_but_full_fine_tuning(monkeypatch, stage, glibc, user, mmap, switch):
    """Fixed mmap thresholds, and freed memory returned (the stage's own memory is the reading), unless glibc's own
    malloc is asked for or the user set the switch; full fine-tuning as the toolkit runs it."""
    seen = {}

    def run(cmd, env, **kwargs):
        seen.update(env)
        return type("Done", (), {"returncode": 0, "stdout": "{}", "stderr": ""})()

    monkeypatch.setattr(llm_scale.subprocess, "run", run)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    if user is None:
        monkeypatch.delenv(llm_scale.SWITCH, raising=False)
    else:
        monkeypatch.setenv(llm_scale.SWITCH, user)
    case = llm_scale.run_case(Path("case"), "float32", "own", stage, 4, 16, None, fixed_mmap=not glibc)
    assert seen.get("MALLOC_MMAP_THRESHOLD_") == mmap and seen.get(llm_scale.SWITCH) == switch
    assert case["keep_freed_memory"] == (switch or "default rule")


def test_the_load_projection_holds_at_least_the_model():
    # an fp32 load maps the file: its measured peak is below the model's bytes, the projection is not
    (p,) = [p for p in llm_scale.project([_case(64, "load", 0.05)]) if p["stage"] == "load"]
    assert p["projected_peak_bytes"] >= p["base_bytes_8b"] and p["label"] == "projection"


@pytest.mark.parametrize("model", ["qwen2-0.5b", "llama3-8b"])
def test_randlora_bases_bytes_are_the_buffers_peft_makes(model):
    # the independent reference: the random bases peft's own RandLoRA allocates on a model of that shape
    from peft import RandLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from experiments.benchmarks.llm_scale_cases import RANKS, TARGETS, scaled_config

    config = scaled_config(model, 128, layers=1, vocab=64)
    peft_model = get_peft_model(AutoModelForCausalLM.from_config(config),
                                RandLoraConfig(r=RANKS["randlora"], target_modules=list(TARGETS)))  # fmt: skip
    storages = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes()
                for n, b in peft_model.named_buffers() if "randlora_A" in n or "randlora_B" in n}  # fmt: skip
    assert llm_scale.randlora_bases_bytes(config) == sum(storages.values())


def test_flatness_reads_the_ratio_without_activations_and_counts_the_bases():
    # two sizes whose memory beyond one batch's activations is the same multiple of held + bases: flat, although
    # their raw ratios differ (activations grow with hidden x layers, the held weights with hidden squared)
    cases = [_case(64, "plane", 0.0, shared_bases_bytes=64_000), _case(128, "plane", 0.0, shared_bases_bytes=256_000)]
    for c, act in zip(cases, (50_000, 400_000), strict=True):
        c["activation_bytes"] = act
        c["peak_rss_above_base_bytes"] = int(1.3 * (c["held_bytes"] + c["shared_bases_bytes"])) + act
        c["ratio"] = c["peak_rss_above_base_bytes"] / c["held_bytes"]
    result = llm_scale.summarise({"cases": cases})
    assert cases[0]["ratio"] != pytest.approx(cases[1]["ratio"], rel=0.05)
    assert [c["ratio_without_activations"] for c in result["cases"]] == pytest.approx([1.3, 1.3], rel=1e-5)
    assert result["flatness"]["qwen2-0.5b/bfloat16/own/plane"] == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("stage", ["curvature", "train_randlora"])
def test_graph_stages_read_their_graph_over_the_activations_and_head_only_has_none(stage):
    # curvature and adapter training hold a few kilobytes of scalings; their graph is 14 x one batch's activations
    # at both sizes while the bases (and the converted copy a RandLoRA training step caches) grow with hidden
    # squared: flat in graph / activations, not in (peak - act) / (held + bases)
    cases = []
    for hidden, act, bases in ((64, 50_000, 64_000), (128, 100_000, 256_000)):
        cache = bases // 4 if stage == "train_randlora" else None
        c = _case(hidden, stage, 0.0, shared_bases_bytes=bases, activation_bytes=act, bases_cache_bytes=cache)
        c["held_bytes"] = hidden * 10
        c["peak_rss_above_base_bytes"] = 14 * act + bases + (cache or 0) + c["held_bytes"]
        c["ratio"] = c["peak_rss_above_base_bytes"] / c["held_bytes"]
        cases.append(c)
    cases += [_case(64, "head_only", 0.3), _case(128, "head_only", 0.15)]  # nothing held: 0.3 vs 0.15 is no spread
    result = llm_scale.summarise({"cases": cases})
    assert [c["graph_over_activations"] for c in cases[:2]] == pytest.approx([14.0, 14.0])
    naive = [(c["peak_rss_above_base_bytes"] - c["activation_bytes"]) / (c["held_bytes"] + c["shared_bases_bytes"])
             for c in cases[:2]]  # fmt: skip
    assert max(naive) / min(naive) > 1.5  # what the flatness read before
    assert result["flatness"] == {f"qwen2-0.5b/bfloat16/own/{stage}": pytest.approx(1.0)}


# --------------------------------------------------------------------------- the scaling projection (llm_scale_plan)


def _meta_llama():
    """Llama-3-8B from its real configuration, built on the meta device (shapes only, no bytes)."""
    import torch
    from transformers import LlamaForCausalLM

    from experiments.benchmarks.llm_scale_cases import full_config

    with torch.device("meta"):
        return LlamaForCausalLM(full_config("llama3-8b"))


def test_scaling_memory_matches_the_parameters_of_the_real_model():
    """The closed-form counts against the model transformers builds from the same configuration: 16 B per
    parameter over N for FT's sharded state, 2 B per parameter for the grid's bf16 base."""
    from experiments.benchmarks import llm_scale_plan as plan

    model = _meta_llama()
    params = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    s = plan.shape()
    assert 8.0e9 < params < 8.1e9 and s["params"] == params and s["block_params"] == block
    assert s["root_params"] == params - len(model.model.layers) * block
    targets = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[-2] in plan.TARGETS)
    assert s["target_params"] == targets
    result = plan.plan()
    for row in result["rows"]:
        assert row["ft_memory"]["sharded_state"] == 16 * params / row["gpus"]
        assert row["grid_memory"]["base_bf16"] == 2 * params
    assert "uncalibrated" in result["label"] or plan.CALIBRATION.exists()


def test_scaling_is_monotone_in_the_gpu_count():
    from experiments.benchmarks import llm_scale_plan as plan

    rows = plan.plan((1, 2, 4, 8, 16), calibration=None)["rows"]
    ft = [r["ft_memory"]["total"] for r in rows]
    assert all(a > b for a, b in zip(ft, ft[1:], strict=False))  # more GPUs, fewer bytes each
    assert not rows[0]["ft_memory"]["fits"] and rows[1]["ft_memory"]["fits"]  # 16 B/param of 8 B: not on one
    grid = [r["grid_time"]["seconds"] for r in rows]
    assert all(a > b for a, b in zip(grid, grid[1:], strict=False))
    assert len({r["grid_memory"]["total"] for r in rows}) == 1  # the grid splits points, not the model
    compute = [r["ft_time"]["compute_s_per_step"] * r["gpus"] for r in rows]
    assert max(compute) / min(compute) - 1 < 1e-12  # compute divides over the GPUs exactly
    comm = [r["ft_time"]["comm_s_per_step"] for r in rows]
    assert comm[0] == 0 and all(a < b for a, b in zip(comm, comm[1:], strict=False))


def test_scaling_uses_a_calibration_file_and_says_so(tmp_path, capsys):
    from experiments.benchmarks import llm_scale_plan as plan

    path = tmp_path / "cal.json"
    assert plan.main(["--calibration", str(path), "--gpus", "1", "2"]) == 0
    assert "PROJECTION (not measured), uncalibrated" in capsys.readouterr().out
    base = plan.plan((2,), None)["rows"][0]
    path.write_text(json.dumps({"device": "NVIDIA H200", "train_efficiency": 0.8, "eval_efficiency": 0.6}))
    out = tmp_path / "plan.json"
    assert plan.main(["--calibration", str(path), "--gpus", "2", "--json", str(out)]) == 0
    assert "calibrated on NVIDIA H200" in capsys.readouterr().out
    row = json.loads(out.read_text())["rows"][0]
    ratio = base["grid_time"]["s_per_point"] / row["grid_time"]["s_per_point"]
    assert abs(ratio - 0.6 / plan.H200_EFFICIENCY) < 1e-9
    path.write_text(json.dumps({"train_efficiency": 1.5, "eval_efficiency": 0.5}))
    assert plan.main(["--calibration", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train_efficiency" in err[0] and "gpu_check --calibrate" in err[0]


def test_training_calibration_runs_and_counts_at_least_the_matmuls():
    """gpu_check --calibrate's training measurement on a CPU-sized Llama (the code the GPU runs): a positive
    efficiency, and counted FLOPs at least 6 x the weights' matmul parameters x tokens (forward + backward)."""
    from experiments.benchmarks import llm_scale_plan as plan

    m = plan.measure_train("cpu", layers=1, batch=1, steps=1, hidden=64, vocab=256)
    matmul = m["params"] - 256 * 64  # all but the embeddings multiply
    assert m["step_flops"] >= 6 * matmul * plan.SEQ and 0 < m["train_efficiency"] < 1 and m["step_s"] > 0


@pytest.mark.parametrize("model", ["qwen2-0.5b", "llama3-8b"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_projected_bases_cache_is_what_a_training_step_converts(model, dtype):
    # the closed form against the fast forward's cache after a real training step of the toolkit's RandLoRA
    import torch
    from transformers import AutoModelForCausalLM

    from adapters.methods import MethodSpec, attach
    from experiments.benchmarks.llm_scale_cases import RANKS, TARGETS, scaled_config
    from experiments.benchmarks.llm_scale_worker import _bases_cache_bytes

    config = scaled_config(model, 128, layers=2, vocab=64)
    base = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    trainable = attach(base, MethodSpec("randlora", rank=RANKS["randlora"]), TARGETS)
    assert _bases_cache_bytes(trainable) == 0  # nothing converted before the first forward
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
        loss = trainable(input_ids=torch.zeros(1, 5, dtype=torch.long)).logits.float().sum()
    loss.backward()
    assert llm_scale.randlora_bases_cache_bytes(config, dtype) == _bases_cache_bytes(trainable) > 0


def test_randlora_training_projects_the_larger_of_its_step_and_the_making_of_its_bases():
    # attach() makes the bases once (here 3x their bytes at its peak); the step's graph is read after it
    from experiments.benchmarks.llm_scale_plan import full_config

    c = _case(2048, "train_randlora", 0.0, shared_bases_bytes=400_000, bases_cache_bytes=50_000, activation_bytes=1)
    c["held_bytes"] = 1_000
    c["peak_rss_above_base_bytes"] = 400_000 + 50_000 + 1_000 + 2  # the graph: twice one batch's activations
    project = {p["stage"]: p for p in llm_scale.project([c])}
    plain = project["train_randlora"]["projected_peak_bytes"]
    made = {p["stage"]: p for p in llm_scale.project([{**c, "attach_peak_above_base_bytes": 1_200_000}])}
    base = made["train_randlora"]["base_bytes_8b"]
    bases = llm_scale.randlora_bases_bytes(full_config("llama3-8b"))
    assert made["train_randlora"]["projected_peak_bytes"] == int(base + 3 * bases) > plain
    small = {p["stage"]: p for p in llm_scale.project([{**c, "attach_peak_above_base_bytes": 100}])}
    assert small["train_randlora"]["projected_peak_bytes"] == plain  # the step's peak is the larger


def test_saved_graph_counts_what_one_backward_holds_once_per_forward():
    # Linear then tanh: autograd keeps the Linear's input (for its weight's gradient) and tanh's output; the weight
    # is the model's own and is not counted; two forwards give the larger one's graph, not their sum
    import torch

    from experiments.benchmarks.llm_scale_worker import _saved_graph

    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh())
    with _saved_graph(model) as graph:
        for batch in (8, 20, 4):
            model(torch.randn(batch, 32)).sum().backward()
    assert graph["max"] == 2 * 20 * 32 * 4


def test_a_4bit_training_step_makes_a_layers_dequantized_weight_the_scratch_graph_readings_leave_out():
    # llm_scale's graph readings on a 4-bit base leave out one layer's fp32 weight (layer_scratch_bytes): to get the
    # input's gradient, bitsandbytes' backward dequantizes the packed weight (its CPU forward does too, inside its
    # gemm_4bit op, below what is recorded here); a dense base's LoRA step makes nothing of the weight's size
    bnb = pytest.importorskip("bitsandbytes")
    import torch
    from peft import LoraConfig, get_peft_model

    from adapters.quant import disable_cpu_repacking
    from tests.made import MadeTensors

    def weight_sized_made(packed: bool) -> int:
        torch.manual_seed(0)
        layer = dense = torch.nn.Linear(64, 128)
        if packed:
            layer = bnb.nn.Linear4bit(64, 128, compute_dtype=torch.float32, quant_type="nf4")
            layer.load_state_dict(dense.state_dict())
            layer = layer.to("cpu")  # quantised here
        model = torch.nn.Sequential(layer)
        disable_cpu_repacking(model)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["0"]))
        x = torch.randn(4, 64, requires_grad=True)  # a layer's input in a model: upstream adapters train
        with MadeTensors() as made:
            model(x).pow(2).sum().backward()
        return sum(n == 64 * 128 for n in made.numels)

    assert weight_sized_made(packed=True) == 1
    assert weight_sized_made(packed=False) == 0
