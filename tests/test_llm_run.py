"""Causal LMs through the toolkit (``--model hf:DIR --dataset commonsense``), against independent references:

- the answer-loss objective, through the encoder, the scorer and :func:`adapters.objectives.score`, equals a
  plain loop over samples calling the HF model with ``labels = -100`` on the prompt (HF's own masked loss);
- candidate-likelihood accuracy equals a brute-force loop over every candidate of every sample;
- the seed's ``RandLoraConfig`` trained through the toolkit gives the bases and ΔW of ``get_peft_model``;
- the whole output contract of ``landscape.connectivity`` on a random Llama-style model and fabricated
  LLM-Adapters files; an unknown hub id offline exits 2 with one line (``--load-4bit``: tests/test_quant4.py).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch

from tests.llm_data import write_commonsense
from tests.llm_models import save_tiny_causal_lm

SEED_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("llama") / "model", "llama")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_commonsense(tmp_path_factory.mktemp("commonsense"), n_train=24, n_test=4)


def _loaded(model_dir: Path, data_root: Path, out: Path, *flags: str):
    from landscape.config import from_argv
    from landscape.run import load

    argv = ["--model", f"hf:{model_dir}", "--dataset", "commonsense", "--data-root", str(data_root), "--out", str(out),
            "--no-progress", *flags]  # fmt: skip
    return load(from_argv(argv))


def _hf_answer_loss(backbone, tokenizer, prompt: str, response: str) -> tuple[float, int]:
    """HF's own loss on one sequence, prompt masked: (mean cross-entropy over the answer tokens, their count)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + response)["input_ids"] + [tokenizer.eos_token_id]
    labels = torch.tensor([-100] * len(prompt_ids) + ids[len(prompt_ids) :])
    with torch.no_grad():
        out = backbone(input_ids=torch.tensor([ids]), labels=labels[None])
    return float(out.loss), int((labels[1:] != -100).sum())


def test_answer_loss_and_candidate_accuracy_equal_plain_loops(llama, data_root, tmp_path):
    from transformers import AutoTokenizer

    from adapters.objectives import score
    from landscape.run import eval_set

    loaded = _loaded(llama, data_root, tmp_path, "--eval-samples", "24")
    loaded.config.eval_tokens = 1500  # several batches of mixed tasks and candidate counts
    assert loaded.task.objective.name == "answer"
    evals = eval_set(loaded, "cpu")
    assert len(evals.batches) > 2
    model = loaded.task.base.eval()
    result = score(lambda inputs: model(**inputs), evals.batches, evals.n, loaded.task.objective, keep_samples=True)[0]

    from adapters.data import eval_subset

    subset = eval_subset(loaded.task.dataset.train, 24, loaded.config.seed)
    tokenizer = AutoTokenizer.from_pretrained(llama)
    losses, right = [], 0
    for record, gold in zip(subset.inputs, subset.labels.tolist(), strict=True):  # one sample at a time
        per_candidate = [_hf_answer_loss(model.backbone, tokenizer, record["prompt"], c) for c in record["candidates"]]
        losses.append(per_candidate[gold][0])
        summed = [mean * count for mean, count in per_candidate]  # -log likelihood of each whole candidate
        right += int(min(range(len(summed)), key=summed.__getitem__) == gold)
    order = loaded.task.entry.encode(subset.inputs).length_order()  # the evaluation set's sample order
    reference = torch.tensor(losses, dtype=torch.float64)[order]
    # fp32 forwards of padded batches vs single sequences round differently: within 1e-6 of the loss (~5.7)
    assert torch.allclose(result.samples, reference, rtol=1e-6, atol=0)
    assert abs(result.loss - float(reference.mean())) < 1e-6
    assert result.accuracy == right / 24


def test_the_seeds_randlora_config_through_the_toolkit_equals_get_peft_model(llama, data_root, tmp_path):
    """The seed (shared/seed): RandLoraConfig(r, alpha 2r, dropout 0.05, q/k/v/up/down, CAUSAL_LM, key
    int(exp(seed)·3.1415·1000)) on AutoModelForCausalLM with gradient checkpointing. Trained through the
    toolkit with the same settings, the adapter's bases equal peft's, and its ΔW equals peft's
    get_delta_weight once the trained λ, γ are loaded into the seed's model."""
    from peft import PeftModel, RandLoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from adapters.solution import load_solution
    from adapters.train import train_solution
    from landscape.run import method_spec, train_config, train_key

    seed, rank = 1, 4
    loaded = _loaded(llama, data_root, tmp_path, "--seed", str(seed), "--randlora-rank", str(rank),
                     "--train-steps", "2", "--batch-size", "4", "--grad-checkpointing")  # fmt: skip
    config = loaded.config
    config.randlora_alpha, config.randlora_dropout, config.projection_prng_key = 2.0 * rank, 0.05, "seed-formula"
    spec = method_spec(loaded, "randlora")
    key = int(torch.exp(torch.tensor(seed)) * 3.1415 * 1000)
    assert (spec.projection_prng_key, spec.alpha, spec.dropout) == (key, 2.0 * rank, 0.05)
    assert tuple(loaded.task.entry.targets) == tuple(SEED_TARGETS)
    folder, cpu = tmp_path / "solutions" / "randlora", torch.device("cpu")
    train_solution(loaded.task, spec, train_config(loaded, "randlora", cpu), train_key(loaded, "randlora", cpu),
                   folder, cpu, progress=False)  # fmt: skip
    ours = load_solution(folder, base=loaded.task.base, expect_method="randlora")

    model = AutoModelForCausalLM.from_pretrained(llama, torch_dtype=torch.float32)  # the seed, step by step
    model.gradient_checkpointing_enable()
    seeds = get_peft_model(model, RandLoraConfig(
        r=rank, randlora_alpha=2 * rank, randlora_dropout=0.05, target_modules=SEED_TARGETS, bias="none",
        task_type="CAUSAL_LM", projection_prng_key=key,
    ))  # fmt: skip
    saved = load_file(folder / "adapter_model.safetensors")  # peft saves λ, γ without the adapter name
    trained = {k.replace("base_model.model.backbone.", "base_model.model.") + ".default": v
               for k, v in saved.items() if "randlora_lambda" in k or "randlora_gamma" in k}  # fmt: skip
    params = dict(seeds.named_parameters())
    assert trained and set(trained) == {n for n in params if "randlora_lambda" in n or "randlora_gamma" in n}
    with torch.no_grad():
        for name, value in trained.items():
            params[name].copy_(value)
    delta = ours.delta()
    layers = [
        (n, m) for n, m in seeds.named_modules() if type(m).__name__ == "Linear" and hasattr(m, "randlora_lambda")
    ]
    assert len(layers) == 2 * len(SEED_TARGETS)  # two decoder layers
    assert len(delta) == len(layers)
    for name, module in layers:
        ours_name = "backbone." + name.removeprefix("base_model.model.") + ".weight"
        torch.testing.assert_close(delta[ours_name], module.get_delta_weight("default").float(), rtol=0, atol=1e-6)
    regenerated = PeftModel.from_pretrained(copy.deepcopy(loaded.task.base), folder)  # our bases, from the key
    bases = lambda m: {n.split("randlora_")[1]: b for n, b in m.named_buffers() if ".randlora_" in n}  # noqa: E731
    theirs, ours_bases = bases(seeds), bases(regenerated)
    assert theirs and set(theirs) == set(ours_bases)
    for n, b in theirs.items():
        assert torch.equal(ours_bases[n], b), n


def test_connectivity_on_a_causal_lm_writes_the_whole_output_contract(llama, data_root, tmp_path):
    from landscape import connectivity

    out = tmp_path / "run"
    assert connectivity.main(["--model", f"hf:{llama}", "--dataset", "commonsense", "--data-root", str(data_root),
                              "--train-steps", "2", "--grid", "3", "--eval-samples", "8", "--out", str(out),
                              "--no-progress"]) == 0  # fmt: skip
    names = ["landscape.npz", "landscape.json", "landscape.html", "landscape.png", "landscape.pdf", "paths.npz",
             "paths.json", "paths.png", "spectrum.json", "spectrum.csv", "spectrum.png"]  # fmt: skip
    for name in names:
        assert (out / name).stat().st_size > 0, name
    import json

    import numpy as np

    meta = json.loads((out / "landscape.json").read_text())
    assert meta["config"]["model"] == f"hf:{llama}" and meta["eval_samples"] == 8
    grid = np.load(out / "landscape.npz")
    assert grid["loss"].shape == (3, 3) and np.isfinite(grid["loss"]).all()
    assert set(json.loads((out / "spectrum.json").read_text())["solutions"]) >= {"ft", "lora", "randlora"}


def _main(capsys, *args: str) -> tuple[int, list[str]]:
    """``landscape.connectivity.main`` in this process (a real process's exit status 2 and single stderr line
    are checked in test_cli and test_config): its exit status and the lines it wrote to stderr."""
    from landscape import connectivity

    capsys.readouterr()
    code = connectivity.main([*args, "--no-progress"])
    return code, capsys.readouterr().err.strip().splitlines()


def test_unknown_hub_id_offline_exits_2_within_30_s(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    code, lines = _main(capsys, "--model", "hf:nobody/no-such-model", "--dataset", "wordnet", "--out",
                        str(tmp_path / "out"))  # fmt: skip
    assert time.monotonic() - start < 30
    assert code == 2 and len(lines) == 1, lines
    assert "nobody/no-such-model" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
