"""Solutions trained elsewhere (:mod:`adapters.foreign`), against independent references.

A tiny random Llama-style model is saved with ``save_pretrained``; adapters of every kind are made with peft
directly on the plain ``AutoModelForCausalLM`` (no wrapper: their names lack our ``backbone.`` prefix), with
every trainable adapter tensor perturbed at random, and saved with ``save_pretrained``. The reference ΔW of
each adapted module is peft's own ``merge_and_unload()`` weight minus the base weight, its spectrum numpy's
SVD; a full checkpoint's reference is ``W − W0`` from the saved tensors.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests import nodraw
from tests.llm_data import write_commonsense
from tests.llm_models import config as llm_config
from tests.llm_models import save_tiny_causal_lm

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
REL = 1e-5  # singular values: within 1e-5 of each layer's largest


def _configs() -> dict:
    import peft

    return {
        "lora": peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False, task_type="CAUSAL_LM"),
        "dora": peft.LoraConfig(r=4, target_modules=TARGETS, use_dora=True, init_lora_weights=False),
        "rslora": peft.LoraConfig(
            r=4, target_modules=TARGETS, use_rslora=True, rank_pattern={"up_proj": 2}, init_lora_weights=False
        ),
        "randlora": peft.RandLoraConfig(r=4, target_modules=TARGETS),
        "vera": peft.VeraConfig(r=4, target_modules=TARGETS),
        "loha": peft.LoHaConfig(r=4, target_modules=TARGETS, init_weights=False),
        "lokr": peft.LoKrConfig(r=4, target_modules=TARGETS, init_weights=False),
        "adalora": peft.AdaLoraConfig(
            init_r=4, target_r=2, total_step=10, target_modules=TARGETS, init_lora_weights=False
        ),
    }


KINDS = ("lora", "dora", "rslora", "randlora", "vera", "loha", "lokr", "adalora")


def _plain(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir)


def _perturb(model, seed: int, scale: float = 0.1, trainable_only: bool = True) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad or not trainable_only:
                p.add_(scale * torch.randn(p.shape, generator=g))


def make_adapter(model_dir: Path, folder: Path, config, seed: int = 0, loader=None) -> tuple[Path, dict, int]:
    """(adapter folder, {plain weight name: reference ΔW}, number of adapted modules) of a peft adapter made on
    the plain transformers model (``loader(model_dir)``, default AutoModelForCausalLM), perturbed and saved;
    the reference is peft's merge_and_unload − W0 on a fresh plain model."""
    from peft import PeftModel, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    loader = loader or _plain
    model = loader(model_dir)
    peft_model = get_peft_model(model, copy.deepcopy(config))
    _perturb(peft_model, seed)
    peft_model.save_pretrained(folder)
    modules = sum(isinstance(m, BaseTunerLayer) for m in peft_model.modules())
    base = loader(model_dir)
    w0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
    reference = {n: (p.detach() - w0[n]) for n, p in merged.named_parameters() if not torch.equal(p, w0[n])}
    return folder, reference, modules


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny_causal_lm(tmp_path_factory.mktemp("llama") / "base", "llama")


@pytest.fixture(scope="module")
def made(llama, tmp_path_factory) -> dict:
    """{kind: (adapter folder, reference ΔW by plain name, adapted module count)}."""
    root = tmp_path_factory.mktemp("adapters")
    return {kind: make_adapter(llama, root / kind, cfg, seed=i) for i, (kind, cfg) in enumerate(_configs().items())}


@pytest.fixture(scope="module")
def checkpoints(llama, tmp_path_factory) -> dict:
    """A fine-tuned copy of the base (every parameter perturbed) as a sharded model folder and as a
    weights_only state-dict file, with the reference W − W0 by plain name."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("ft")
    base, tuned = _plain(llama), _plain(llama)
    _perturb(tuned, seed=7, scale=0.02, trainable_only=False)
    tuned.save_pretrained(root / "folder", max_shard_size="40KB")  # several shards and their index
    torch.save(tuned.state_dict(), root / "ft.pt")
    save_file({n: p.detach().contiguous() for n, p in tuned.named_parameters()}, root / "ft.safetensors")
    w0 = dict(base.named_parameters())
    reference = {n: (p.detach() - w0[n].detach()) for n, p in tuned.named_parameters()}
    return {"folder": root / "folder", "pt": root / "ft.pt", "file": root / "ft.safetensors", "reference": reference}


def _spectrum(argv: list[str], capsys) -> tuple[int, list[str]]:
    from landscape.spectrum import cli

    capsys.readouterr()  # drop what the test's own setup printed (e.g. a library's deprecation notice)
    code = cli.main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, err


def _svd(d: torch.Tensor) -> np.ndarray:
    return np.linalg.svd(d.double().reshape(d.shape[0], -1).numpy(), compute_uv=False)


def _assert_spectra(spec: dict, name: str, reference: dict) -> None:
    """Every reference layer is in spectrum.json under our name (backbone.) with numpy's singular values."""
    layers = {layer["name"]: layer for layer in spec["layers"]}
    for plain, d in reference.items():
        if d.ndim < 2:
            continue
        got = np.asarray(layers["backbone." + plain][name]["singular_values"])
        want = _svd(d)
        assert got.shape == want.shape, plain
        np.testing.assert_allclose(got, want, rtol=0, atol=REL * want[0], err_msg=f"{name} {plain}")


# --------------------------------------------------------------------------- adapters of every kind


@pytest.fixture(scope="module")
def spectrum_run(llama, made, checkpoints, tmp_path_factory) -> dict:
    """One in-process ``python -m landscape.spectrum --model hf:DIR --solution ...`` over every adapter kind
    and both checkpoint formats (figures built, not drawn: drawing is what costs)."""
    from landscape.spectrum import cli

    out = tmp_path_factory.mktemp("spectrum")
    named = [f"{k}={made[k][0]}" for k in KINDS] + [f"folder={checkpoints['folder']}", f"pt={checkpoints['pt']}"]
    with nodraw.figures_not_drawn():  # only spectrum.json is read
        assert cli.main(["--model", f"hf:{llama}", "--solution", *named, "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "spectrum.json").read_text())


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_spectrum_equals_numpy_svd_of_peft_merge(kind, made, spectrum_run):
    _, reference, modules = made[kind]
    assert len(reference) == modules  # every adapted module changed (a weight each: no bias here)
    assert len(spectrum_run["layers"]) == modules
    assert {layer["name"] for layer in spectrum_run["layers"]} == {"backbone." + n for n in reference}
    _assert_spectra(spectrum_run, kind, reference)
    expected_method = {"dora": "lora", "rslora": "lora"}.get(kind, kind)
    assert spectrum_run["solutions"][kind]["method"] == expected_method


def test_checkpoints_as_ft_solutions_in_spectrum(llama, checkpoints, spectrum_run):
    from adapters.solution import load_solutions

    folder_files = sorted(p.name for p in checkpoints["folder"].glob("*.safetensors"))
    assert len(folder_files) > 1 and (checkpoints["folder"] / "model.safetensors.index.json").is_file()
    names = {layer["name"] for layer in spectrum_run["layers"]}
    analysed = {n: d for n, d in checkpoints["reference"].items() if "backbone." + n in names}
    assert len(analysed) == len(names)
    _assert_spectra(spectrum_run, "folder", analysed)
    _assert_spectra(spectrum_run, "pt", analysed)
    assert spectrum_run["settings"]["reference"] == "folder"  # the first solution of method ft
    # every parameter (1-D norms too): W − W0 by name, from every format (a .safetensors file too)
    sols = load_solutions({k: checkpoints[k] for k in ("folder", "pt", "file")}, f"hf:{llama}")
    for sol in sols.values():
        delta = sol.delta()
        assert sol.method == "ft" and set(delta) == {"backbone." + n for n in checkpoints["reference"]}
        for n, d in checkpoints["reference"].items():
            torch.testing.assert_close(delta["backbone." + n], d, rtol=0, atol=1e-7)


def test_base_from_base_model_name_or_path(made, llama):
    """Without a model, an adapter's own base_model_name_or_path (through hf:) is the base."""
    from adapters.solution import load_solutions

    folder, reference, _ = made["loha"]
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(llama)
    sol = load_solutions({"loha": folder})["loha"]
    assert sol.info["model"] == f"hf:{llama}" and type(sol.base).__name__ == "CausalLMScorer"  # lm: a causal LM
    delta = sol.delta()
    for n, d in reference.items():
        np.testing.assert_allclose(_svd(delta["backbone." + n]), _svd(d), rtol=0, atol=REL * _svd(d)[0])


def test_ranks_variants_and_info_recorded(llama, made):
    from adapters.solution import load_solutions

    sols = load_solutions({k: made[k][0] for k in ("rslora", "dora", "adalora")}, f"hf:{llama}")
    ranks = sols["rslora"].info["ranks"]
    up = [n for n in ranks if n.endswith("up_proj.weight")]
    assert up and all(ranks[n] == 2 for n in up)  # rank_pattern
    assert all(r == 4 for n, r in ranks.items() if n not in up) and sols["rslora"].info["rank"] == 4
    assert sols["rslora"].info["variants"] == ["rslora"] and sols["dora"].info["variants"] == ["dora"]
    assert set(sols["adalora"].info["ranks"].values()) == {4}  # AdaLoRA's init_r
    assert sols["dora"].info["zero_updates"] == [] and sols["dora"].info["source"] == "peft-adapter"
    # counted from the saved file: every tensor the adapter saved under the model
    from safetensors import safe_open

    with safe_open(str(made["dora"][0] / "adapter_model.safetensors"), "pt") as f:
        count = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
    assert sols["dora"].info["trainable_params"] == count


def test_lora_bias_on_a_model_with_biases(tmp_path, capsys):
    """Qwen2's q/k/v have biases: lora_bias changes them, which get_delta_weight leaves out; merge does not."""
    import peft

    from adapters.solution import load_solutions

    qwen = save_tiny_causal_lm(tmp_path / "qwen", "qwen2")
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_bias=True, init_lora_weights=False)
    folder, reference, modules = make_adapter(qwen, tmp_path / "bias", config, seed=3)
    biases = [n for n in reference if n.endswith(".bias")]
    assert len(biases) == modules  # the reference merge changed each adapted layer's bias
    delta = load_solutions({"lora": folder}, f"hf:{qwen}")["lora"].delta()
    assert set(delta) == {"backbone." + n for n in reference}
    for n, d in reference.items():
        torch.testing.assert_close(delta["backbone." + n], d, rtol=0, atol=1e-6 * float(d.abs().max()) + 1e-7)


def test_encoder_base_and_a_base_model_prefix(tmp_path):
    """An encoder folder (BertModel) is built as our text classifier (modality text); a LoRA made on the plain
    BertModel (names ``encoder.…``) and one made on BertForSequenceClassification (``bert.encoder.…``, the
    transformers ``base_model_prefix``) both land on ``backbone.encoder.…`` with peft's merge as ΔW."""
    import peft
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    from adapters.solution import load_solutions
    from tests.llm_models import tokenizer

    tok = tokenizer()
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    lora = peft.LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False)
    _, reference, modules = make_adapter(tmp_path / "bert", tmp_path / "plain", lora, loader=BertModel.from_pretrained)
    classifier = BertForSequenceClassification.from_pretrained(tmp_path / "bert", num_labels=2)
    seq = peft.get_peft_model(classifier, copy.deepcopy(lora))
    _perturb(seq, seed=5)
    seq.save_pretrained(tmp_path / "seq")
    want = {
        n.removeprefix("bert."): m.get_delta_weight("default")
        for n, m in seq.base_model.model.named_modules()
        if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})
    }
    sols = load_solutions({"plain": tmp_path / "plain", "seq": tmp_path / "seq"}, f"hf:{tmp_path / 'bert'}")
    assert type(sols["plain"].base).__name__ == "HFClassifier" and len(reference) == modules == len(want)
    for n, d in reference.items():
        torch.testing.assert_close(sols["plain"].delta()["backbone." + n], d, rtol=0, atol=1e-6)
    got = sols["seq"].delta()
    assert set(got) == {f"backbone.{n}.weight" for n in want}
    for n, d in want.items():
        torch.testing.assert_close(got[f"backbone.{n}.weight"], d.detach(), rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- adapters that do not fit


def _one_line(code: int, err: list[str]) -> str:
    assert code == 2 and len(err) == 1, err
    return err[0]


def test_adapter_of_a_deeper_model_names_the_first_missing_module(llama, tmp_path):
    """A real ``python -m landscape.spectrum`` process: exit 2, one line on stderr, nothing written."""
    import peft
    from transformers import AutoModelForCausalLM

    deeper_config = llm_config("llama", _plain(llama).config.vocab_size)
    deeper_config.num_hidden_layers = 3
    torch.manual_seed(0)
    deeper = AutoModelForCausalLM.from_config(deeper_config)
    folder = tmp_path / "deeper"
    peft.get_peft_model(deeper, peft.LoraConfig(r=2, target_modules=TARGETS)).save_pretrained(folder)
    cmd = [
        sys.executable,
        "-m",
        "landscape.spectrum",
        "--model",
        f"hf:{llama}",
        "--solution",
        f"x={folder}",
        "--out",
        str(tmp_path / "o"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    line = _one_line(proc.returncode, err)
    assert "'model.layers.2.mlp.down_proj'" in line and "(and 3 more)" in line and "lacks" in line, line
    assert not (tmp_path / "o").exists()


def test_renamed_module_and_unknown_modules_to_save(llama, made, tmp_path, capsys):
    import peft
    from safetensors.torch import load_file, save_file

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "adapter_config.json").write_text((made["lora"][0] / "adapter_config.json").read_text())
    state = load_file(made["lora"][0] / "adapter_model.safetensors")
    save_file(
        {k.replace("self_attn.q_proj", "self_attn.query"): v for k, v in state.items()},
        renamed / "adapter_model.safetensors",
    )
    line = _one_line(
        *_spectrum(["--model", f"hf:{llama}", "--solution", f"x={renamed}", "--out", str(tmp_path / "o1")], capsys)
    )
    assert "'model.layers.0.self_attn.query'" in line, line

    score = tmp_path / "score"
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["score"])
    peft.get_peft_model(_plain(llama), config).save_pretrained(score)  # peft accepts the unknown name silently
    line = _one_line(
        *_spectrum(["--model", f"hf:{llama}", "--solution", f"x={score}", "--out", str(tmp_path / "o2")], capsys)
    )
    assert "modules_to_save 'score'" in line, line


# --------------------------------------------------------------------------- full checkpoints


def test_checkpoint_shape_mismatch_and_pickled_objects_give_one_line(llama, checkpoints, tmp_path, capsys):
    state = torch.load(checkpoints["pt"], weights_only=True)
    state["model.layers.0.self_attn.q_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"][:16]
    torch.save(state, tmp_path / "bad.pt")
    line = _one_line(
        *_spectrum(
            ["--model", f"hf:{llama}", "--solution", f"ft={tmp_path / 'bad.pt'}", "--out", str(tmp_path / "o1")], capsys
        )
    )
    assert "'model.layers.0.self_attn.q_proj.weight' (16, 32)" in line and "(32, 32)" in line, line

    marker = tmp_path / "unpickled"
    torch.save({"weights": state, "trap": Trap(str(marker))}, tmp_path / "pickled.pt")
    line = _one_line(
        *_spectrum(
            ["--model", f"hf:{llama}", "--solution", f"ft={tmp_path / 'pickled.pt'}", "--out", str(tmp_path / "o2")],
            capsys,
        )
    )
    assert "cannot be read as tensors only" in line and "a pickled tests.test_foreign._touch" in line, line
    assert not marker.exists()  # the object was never unpickled

    nan = torch.load(checkpoints["pt"], weights_only=True)
    nan["model.norm.weight"] = nan["model.norm.weight"].clone()
    nan["model.norm.weight"][3] = float("inf")
    torch.save(nan, tmp_path / "nan.pt")
    line = _one_line(
        *_spectrum(
            ["--model", f"hf:{llama}", "--solution", f"ft={tmp_path / 'nan.pt'}", "--out", str(tmp_path / "o4")], capsys
        )
    )
    assert line.endswith("nan.pt has NaN/inf in 'backbone.model.norm.weight': the training diverged; re-train it")

    extra = dict(state)
    extra["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 32)
    extra["model.layers.0.self_attn.gate.weight"] = torch.zeros(4, 4)
    torch.save(extra, tmp_path / "extra.pt")
    line = _one_line(
        *_spectrum(
            ["--model", f"hf:{llama}", "--solution", f"ft={tmp_path / 'extra.pt'}", "--out", str(tmp_path / "o3")],
            capsys,
        )
    )
    assert "'model.layers.0.self_attn.gate.weight', which matches no parameter" in line, line


class Trap:
    """Writes a marker file when unpickled: proves a file is never unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (_touch, (self.path,))


def _touch(path: str) -> None:
    Path(path).write_text("unpickled")


# --------------------------------------------------------------------------- zero updates, memory


def test_exactly_zero_layer_is_kept_and_reported(llama, tmp_path, capsys):
    import peft

    from adapters.solution import load_solutions

    model = _plain(llama)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    with torch.no_grad():
        peft_model.base_model.model.model.layers[1].self_attn.q_proj.lora_B["default"].weight.zero_()
    peft_model.save_pretrained(tmp_path / "zero")
    capsys.readouterr()
    sol = load_solutions({"lora": tmp_path / "zero"}, f"hf:{llama}")["lora"]
    zero = "backbone.model.layers.1.self_attn.q_proj.weight"
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(err) == 1 and "1 update(s) exactly zero" in err[0] and zero in err[0], err
    assert sol.info["zero_updates"] == [zero]
    delta, lazy = sol.delta(), sol.module_deltas()
    assert zero in delta and not delta[zero].any() and zero in lazy
    assert delta["backbone.model.layers.0.self_attn.q_proj.weight"].any()


def test_loading_and_fingerprint_stream_without_delta(llama, made, tmp_path, monkeypatch, tiny_entry):
    """load_solution / load_solutions / delta_fingerprint never call Solution.delta() and keep nothing; the
    fingerprint changes with any ΔW (a foreign adapter and a tool-written ft folder)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from adapters.solution import Solution, delta_fingerprint, load_solution, load_solutions, save_solution

    def forbidden(self):
        raise AssertionError("Solution.delta() called")

    monkeypatch.setattr(Solution, "delta", forbidden)
    copy_dir = tmp_path / "lora2"
    shutil.copytree(made["lora"][0], copy_dir)
    sols = load_solutions({"a": made["lora"][0], "b": copy_dir}, f"hf:{llama}")
    assert all(s._delta is None for s in sols.values())
    assert delta_fingerprint(sols["a"]) == delta_fingerprint(sols["b"])
    state = load_file(copy_dir / "adapter_model.safetensors")
    key = next(k for k in state if "lora_B" in k)
    state[key] = state[key].clone()
    state[key][0, 0] += 1e-3
    save_file(state, copy_dir / "adapter_model.safetensors")
    assert delta_fingerprint(sols["a"]) != delta_fingerprint(sols["b"])

    base = tiny_entry.build(3)
    tuned = copy.deepcopy(base)
    _perturb(tuned, seed=1, scale=0.01, trainable_only=False)
    info = {"name": "ft", "method": "ft", "model": tiny_entry.name, "num_classes": 3}
    save_solution(tmp_path / "ft", tuned, info, {})
    sol = load_solution(tmp_path / "ft", base=base)
    before = delta_fingerprint(sol)
    weights = load_file(tmp_path / "ft" / "model.safetensors")
    name = sorted(weights)[-1]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1e-4
    save_file(weights, tmp_path / "ft" / "model.safetensors")
    assert delta_fingerprint(sol) != before and sol._delta is None


# --------------------------------------------------------------------------- the plane


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_commonsense(tmp_path_factory.mktemp("commonsense"), n_train=8, n_test=2)


def _connectivity(llama: Path, data_root: Path, out: Path, capsys, *solutions: str, storage: str = "auto"):
    """(exit code, error lines) of an in-process ``python -m landscape.connectivity`` on the tiny commonsense run."""
    from landscape import connectivity

    flags = "--dataset commonsense --train-steps 2 --grid 3 --eval-samples 8 --path-points 3 --no-progress".split()
    argv = ["--model", f"hf:{llama}", "--data-root", str(data_root), "--out", str(out), *flags]
    code = connectivity.main([*argv, "--plane-storage", storage, "--solutions", *solutions])
    return code, [line for line in capsys.readouterr().err.splitlines() if "error" in line]


def test_connectivity_with_foreign_solutions(llama, made, checkpoints, data_root, tmp_path, capsys, no_figure_drawing):
    """A model folder, a DoRA and a LoHa adapter as the plane's ft / lora / randlora: the whole run, on the
    factored plane (the adapters' ΔW merged by peft per module at every forward, the checkpoint's stored).
    Each vertex's loss equals the plain model's (the checkpoint loaded by transformers, the adapters merged
    by peft's merge_and_unload) on the run's evaluation set."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapters.models.hf import CausalLMScorer
    from adapters.objectives import score
    from landscape.config import from_argv
    from landscape.run import eval_set, load

    out = tmp_path / "run"
    given = [f"ft={checkpoints['folder']}", f"lora={made['dora'][0]}", f"randlora={made['loha'][0]}"]
    code, err = _connectivity(llama, data_root, out, capsys, *given, storage="factored")
    assert code == 0, err
    meta = json.loads((out / "landscape.json").read_text())
    assert meta["config"]["solutions"]["ft"] == str(checkpoints["folder"])
    assert meta["chart_geometry"]["storage"] == "factored"
    grid = np.load(out / "landscape.npz")
    assert grid["loss"].shape == (3, 3) and np.isfinite(grid["loss"]).all()
    spec = json.loads((out / "spectrum.json").read_text())
    names = {layer["name"] for layer in spec["layers"]}
    assert names == {"backbone." + n for n in made["dora"][1]}
    _assert_spectra(spec, "ft", {n: d for n, d in checkpoints["reference"].items() if "backbone." + n in names})
    _assert_spectra(spec, "lora", made["dora"][1])
    _assert_spectra(spec, "randlora", made["loha"][1])

    flags = ["--dataset", "commonsense", "--data-root", str(data_root), "--eval-samples", "8"]
    loaded = load(from_argv(["--model", f"hf:{llama}", *flags, "--out", str(tmp_path / "ref")]))
    evals = eval_set(loaded, "cpu")
    plain = {
        "ft": AutoModelForCausalLM.from_pretrained(checkpoints["folder"]),
        "lora": PeftModel.from_pretrained(_plain(llama), made["dora"][0]).merge_and_unload(),
        "randlora": PeftModel.from_pretrained(_plain(llama), made["loha"][0]).merge_and_unload(),
    }
    for s, model in plain.items():
        with torch.no_grad():
            want = score(_forward(CausalLMScorer(model).eval()), evals.batches, evals.n, loaded.task.objective)[0]
        assert meta["solutions"][s]["vertex_loss"] == pytest.approx(want.loss, rel=1e-5), s


def _forward(scorer):
    return lambda inputs: scorer(**inputs)


def test_connectivity_loads_a_state_dict_as_ft(llama, made, checkpoints, data_root, tmp_path):
    """The state-dict file as ft= (with a LoRA and a RandLoRA made with peft): the run's own loading."""
    from landscape.config import from_argv
    from landscape.run import load

    argv = [
        "--model",
        f"hf:{llama}",
        "--dataset",
        "commonsense",
        "--data-root",
        str(data_root),
        "--out",
        str(tmp_path / "o"),
        "--solutions",
        f"ft={checkpoints['pt']}",
        f"lora={made['lora'][0]}",
        f"randlora={made['randlora'][0]}",
    ]
    loaded = load(from_argv(argv))
    assert {s: sol.method for s, sol in loaded.solutions.items()} == {
        "ft": "ft",
        "lora": "lora",
        "randlora": "randlora",
    }
    assert all(sol.base is loaded.task.base for sol in loaded.solutions.values())
    delta = loaded.solutions["ft"].delta()
    for n, d in checkpoints["reference"].items():
        torch.testing.assert_close(delta["backbone." + n], d, rtol=0, atol=1e-7)
    for s in ("lora", "randlora"):
        got = loaded.solutions[s].delta()
        for n, d in made[s][1].items():
            torch.testing.assert_close(got["backbone." + n], d, rtol=0, atol=1e-6 * float(d.abs().max()))


def test_connectivity_refuses_impossible_slots_before_loading(llama, made, checkpoints, data_root, tmp_path, capsys):
    cases = [
        ((f"lora={checkpoints['folder']}",), "is a full model checkpoint, not a lora adapter: pass ft="),
        ((f"ft={made['lora'][0]}",), "is a peft LORA adapter, not a full fine-tuning"),
        ((f"randlora={made['dora'][0]}",), "is a peft LORA adapter (dora), not randlora: pass lora="),
        ((f"lora={made['randlora'][0]}",), "is a peft RANDLORA adapter, not lora: pass randlora="),
    ]
    for solutions, message in cases:
        code, err = _connectivity(llama, data_root, tmp_path / "o", capsys, *solutions)
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert not (tmp_path / "o").exists()
