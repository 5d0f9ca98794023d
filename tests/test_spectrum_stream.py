"""The streamed spectral analysis (one layer's ΔW at a time, read lazily from the solutions' files) and the weight
spectra of W0 and W0 + ΔW, on a tiny random Llama with FT / LoRA / RandLoRA solutions saved in the toolkit's
formats.

References: the resident analysis of the same solutions (every dense ``sol.delta()`` in memory at once: the
implementation before streaming), numpy's SVD, and peft's own ``merge_and_unload`` for W0 + ΔW of the adapters.
"""

from __future__ import annotations

import copy
import csv
import json
import shutil
import weakref

import numpy as np
import pytest
import torch

from adapters.errors import UserError
from landscape.spectrum import analyse, analyse_solutions
from landscape.spectrum.metrics import write_csv
from landscape.spectrum.updates import (
    LazyDelta,
    adapted_layers,
    lora_factors,
    matrix_shape,
    natural_key,
    solution_deltas,
)

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")
METHODS = {"ft": None, "lora": 4, "randlora": 4}
ZERO = "backbone.model.layers.1.self_attn.v_proj.weight"  # LoRA leaves it unchanged (B = 0): no layer for anyone


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """(folder, base): a random 2-block Llama (hidden 32) and its three solutions, every trainable tensor
    perturbed at random, except the LoRA B of ``ZERO``."""
    from adapters.methods import MethodSpec, attach
    from adapters.models import hf
    from adapters.solution import save_solution
    from tests.llm_models import save_tiny_causal_lm

    folder = tmp_path_factory.mktemp("stream")
    save_tiny_causal_lm(folder / "base")
    base = hf.entry(str(folder / "base"), "lm").build(0)
    g = torch.Generator().manual_seed(3)
    for method, rank in METHODS.items():
        model = attach(copy.deepcopy(base), MethodSpec(method, rank=rank), TARGETS)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and not (method == "lora" and "layers.1.self_attn.v_proj.lora_B" in name):
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        info = {"name": method, "method": method, "model": "tiny-llama", "num_classes": 0, "rank": rank}
        save_solution(folder / method, model, info, {})
    return folder, base


def solutions_of(folder, base, names=tuple(METHODS)) -> dict:
    from adapters.solution import Solution, read_info

    return {n: Solution(path=folder / n, info=read_info(folder / n), metrics={}, base=base) for n in names}


def resident(solutions: dict, weight_spectra: bool) -> dict:
    """The analysis as it was before streaming: every solution's dense delta() (LoRA: its factors) at once."""
    from landscape.spectrum.floor import floor_dtype

    deltas = {n: solution_deltas(s) for n, s in solutions.items()}
    result = analyse(deltas, layers=adapted_layers(deltas), progress=False,
                     base=dict(next(iter(solutions.values())).base.named_parameters()), rank=METHODS["lora"],
                     reference="ft", weight_spectra=weight_spectra,
                     floor_dtypes={n: floor_dtype(s) for n, s in solutions.items()})  # fmt: skip
    result["solutions"] = {n: {"method": s.method, "rank": s.info.get("rank"), "path": str(s.path)}
                           for n, s in solutions.items()}  # fmt: skip
    return result


def as_json(result: dict) -> dict:
    return json.loads(json.dumps(result))


@pytest.mark.parametrize("weight_spectra", [False, True])
def test_streamed_equals_the_resident_analysis(case, weight_spectra):
    folder, base = case
    streamed = analyse_solutions(solutions_of(folder, base), progress=False, weight_spectra=weight_spectra)
    assert as_json(streamed) == as_json(resident(solutions_of(folder, base), weight_spectra))  # bit for bit
    names = [layer["name"] for layer in streamed["layers"]]
    assert len(names) == 2 * len(TARGETS) - 1 and ZERO not in names  # delta() leaves the zero update out
    assert streamed["settings"]["weight_spectra"] is weight_spectra
    if weight_spectra:  # the weight spectra add keys and change nothing else
        plain = analyse_solutions(solutions_of(folder, base), progress=False, weight_spectra=False)
        for layer, other in zip(as_json(streamed)["layers"], as_json(plain)["layers"], strict=True):
            assert layer.pop("base")["singular_values"]
            for sol in METHODS:
                assert layer[sol].pop("weight_spectrum")["singular_values"]
                # the intruder vectors then come from the weight spectrum's fp64 Gram matrix, not an fp32 one
                got, ref = layer[sol].pop("intruders"), other[sol].pop("intruders")
                np.testing.assert_allclose(got["max_cos"], ref["max_cos"], atol=1e-4)
                assert got["count"] == ref["count"]
            assert layer == other


def test_a_foreign_solutions_zero_update_keeps_its_layer(case, tmp_path):
    """A solution trained elsewhere (here our LoRA as a bare peft folder) keeps its exactly-zero updates in
    delta(): its zero layer stays in the streamed analysis too, with rank 0, as in the resident one."""
    from adapters import foreign

    folder, base = case
    bare = tmp_path / "lora"
    shutil.copytree(folder / "lora", bare)
    (bare / "solution.json").unlink()
    own = solutions_of(folder, base, ("ft", "randlora"))
    solutions = {"ft": own["ft"], "lora": foreign.load(bare, base, foreign.describe(bare, "lora")),
                 "randlora": own["randlora"]}  # fmt: skip
    streamed = analyse_solutions(solutions, progress=False)
    assert as_json(streamed) == as_json(resident(solutions, True))
    zero = next(layer for layer in streamed["layers"] if layer["name"] == ZERO)
    assert zero["lora"]["rank"] == 0 and zero["ft"]["rank"] > 0 and zero["randlora"]["rank"] > 0


def merged_weights(folder, base, method: str) -> dict[str, torch.Tensor]:
    """W0 + ΔW independently of the toolkit: the FT file itself, or peft's merge_and_unload of the adapter."""
    from peft import PeftModel
    from safetensors.torch import load_file

    if method == "ft":
        return load_file(folder / "ft" / "model.safetensors")
    merged = PeftModel.from_pretrained(copy.deepcopy(base), folder / method).merge_and_unload()
    return {n: p.detach() for n, p in merged.named_parameters()}


def svd(m: torch.Tensor) -> np.ndarray:
    return np.linalg.svd(m.double().numpy(), compute_uv=False)


def test_weight_spectra_match_numpy_and_peft_merge(case, tmp_path):
    folder, base = case
    result = analyse_solutions(solutions_of(folder, base), progress=False)
    w0s = dict(base.named_parameters())
    merged = {m: merged_weights(folder, base, m) for m in METHODS}
    for layer in result["layers"]:
        w0 = w0s[layer["name"]].detach()
        s0 = svd(w0)
        got = np.asarray(layer["base"]["singular_values"])
        assert np.abs(got - s0).max() <= 1e-6 * s0[0]
        assert layer["base"]["s_max"] == pytest.approx(s0[0], rel=1e-6)
        assert layer["base"]["frobenius_norm"] == pytest.approx(np.sqrt(np.sum(s0**2)), rel=1e-6)
        assert layer["base"]["stable_rank"] == pytest.approx(np.sum(s0**2) / s0[0] ** 2, rel=1e-5)
        for method in METHODS:
            w = merged[method][layer["name"]].float()
            s_w, s_d = svd(w), svd(w - w0)
            entry = layer[method]
            assert np.abs(np.asarray(entry["weight_spectrum"]["singular_values"]) - s_w).max() <= 1e-5 * s_w[0]
            assert np.abs(np.asarray(entry["singular_values"]) - s_d).max() <= 1e-5 * s_d[0]
            rel = np.sqrt(np.sum(s_d**2) / np.sum(s0**2))
            assert entry["weight_spectrum"]["relative_update"] == pytest.approx(rel, rel=1e-4)

    write_csv(result, tmp_path / "spectrum.csv")
    rows = list(csv.DictReader((tmp_path / "spectrum.csv").open()))
    assert len(rows) == len(METHODS) * len(result["layers"])
    layers = {layer["name"]: layer for layer in result["layers"]}
    for row in rows:
        layer = layers[row["layer"]]
        ws = layer[row["solution"]]["weight_spectrum"]
        assert float(row["base_s_max"]) == pytest.approx(layer["base"]["s_max"])
        assert float(row["base_effective_rank"]) == pytest.approx(layer["base"]["effective_rank"])
        assert float(row["weight_stable_rank"]) == pytest.approx(ws["stable_rank"])
        assert float(row["relative_update"]) == pytest.approx(ws["relative_update"])

    plain = analyse_solutions(solutions_of(folder, base), progress=False, weight_spectra=False)
    write_csv(plain, tmp_path / "plain.csv")
    header = next(csv.reader((tmp_path / "plain.csv").open()))
    assert not [c for c in header if c.startswith(("base_", "weight_")) or c == "relative_update"]
    assert all("base" not in layer and "weight_spectrum" not in layer["ft"] for layer in plain["layers"])


class Recorder:
    """Wraps a lazy ΔW: records each call and hands out a tensor whose memory a weakref can watch (a numpy
    array owns it, so it lives as long as any view of it)."""

    def __init__(self, log: list, alive: list, solution: str, name: str, compute):
        self.log, self.alive, self.solution, self.name, self.compute = log, alive, solution, name, compute
        self.shape = compute.shape

    def __call__(self) -> torch.Tensor:
        live = [key for key, ref in self.alive if ref() is not None]
        self.log.append(((self.solution, self.name), live))
        array = self.compute().numpy().copy()
        self.alive.append(((self.solution, self.name), weakref.ref(array)))
        return torch.from_numpy(array)


def test_layers_are_streamed_once_each_and_released(case, monkeypatch):
    from adapters.solution import Solution

    folder, base = case
    log, alive = [], []
    real = Solution.module_deltas

    def recording(self, check=True):
        return {n: Recorder(log, alive, self.method, n, d) for n, d in real(self, check).items()}

    monkeypatch.setattr(Solution, "module_deltas", recording)
    result = analyse_solutions(solutions_of(folder, base), progress=False)
    monkeypatch.undo()

    # the order the analysis walks: layers grouped by shape (first appearance), natural order within a group
    names = sorted([*(layer["name"] for layer in result["layers"]), ZERO], key=natural_key)
    shapes = {n: matrix_shape(dict(base.named_parameters())[n].shape) for n in names}
    order = [n for shape in dict.fromkeys(shapes.values()) for n in names if shapes[n] == shape]
    # LoRA's and RandLoRA's layers come from their factors (never made dense); FT's each read exactly once,
    # layer after layer, and nothing earlier still alive when the next is read
    assert [key for key, _ in log] == [("ft", n) for n in order]
    assert all(live == [] for _, live in log)
    assert all(ref() is None for _, ref in alive)  # nothing kept once the analysis returns


def test_chunks_of_lazy_updates_are_bounded_by_bytes():
    """Off the LAPACK path (here method "svd"), layers of one shape are stacked by chunks within chunk_bytes:
    a solution's layers of one chunk are the only updates alive when it reads the next."""
    g = torch.Generator().manual_seed(5)
    names = [f"blocks.{i}.w" for i in range(5)]
    dense = {s: {n: torch.randn(24, 16, generator=g) for n in names} for s in ("ft", "randlora")}
    log, alive = [], []
    lazy = {
        s: {n: Recorder(log, alive, s, n, LazyDelta(n, t.shape, lambda t=t: t.clone(), s)) for n, t in params.items()}
        for s, params in dense.items()
    }  # fmt: skip
    per_chunk = 2
    got = analyse(lazy, progress=False, method="svd", chunk_bytes=per_chunk * 24 * 16 * 8 * 4)
    chunks = [names[i : i + per_chunk] for i in range(0, len(names), per_chunk)]
    assert [key for key, _ in log] == [(s, n) for c in chunks for s in dense for n in c]
    for (solution, name), live in log:
        chunk = next(c for c in chunks if name in c)
        assert live == [(solution, n) for n in chunk[: chunk.index(name)]]
    assert as_json(got) == as_json(analyse(dense, progress=False, method="svd"))
    for layer in got["layers"]:
        for s in dense:
            want = svd(dense[s][layer["name"]])
            np.testing.assert_allclose(layer[s]["singular_values"], want, rtol=1e-5, atol=1e-6 * want[0])


def test_a_diverged_solution_is_a_one_line_user_error(case, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, base = case
    broken = tmp_path / "ft"
    shutil.copytree(folder / "ft", broken)
    state = load_file(broken / "model.safetensors")
    state["backbone.model.layers.0.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, broken / "model.safetensors")
    solutions = solutions_of(folder, base, ("lora",)) | {"ft": solutions_of(tmp_path, base, ("ft",))["ft"]}
    with pytest.raises(UserError) as err:
        analyse_solutions(solutions, progress=False)
    message = str(err.value)
    assert "\n" not in message and "NaN" in message and "layers.0.mlp.up_proj.weight" in message
    assert "re-train" in message


def test_lora_factors_share_the_base_and_leave_it_as_it_was(case):
    """peft attaches to a skeleton of the base (no copy of its weights); the factors are peft's own."""
    from peft import PeftModel

    folder, base = case
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    sol = solutions_of(folder, base, ("lora",))["lora"]
    factors = lora_factors(sol)
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())
    merged = PeftModel.from_pretrained(copy.deepcopy(base), folder / "lora").merge_and_unload()
    merged = dict(merged.named_parameters())
    assert sorted(factors, key=natural_key) == sorted(
        (n for n in merged if any(f"{t}.weight" in n for t in TARGETS)), key=natural_key
    )
    for name, low in factors.items():
        torch.testing.assert_close(low.dense(), merged[name].detach() - before[name], rtol=1e-5, atol=1e-6)


def test_memory_benchmark_spectrum_case(tmp_path, monkeypatch):
    """The benchmark's spectrum case end to end on a tiny model (its worker in this process, not a fresh one):
    its figures are consistent with each other and with the model's shapes."""
    from experiments.benchmarks import memory

    monkeypatch.setattr(memory, "run_spectrum_case", lambda case, threads, mmap: memory.spectrum_worker(case))
    out = tmp_path / "memory.json"
    threads = torch.get_num_threads()
    try:
        assert memory.main(["--parts", "spectrum", "--spectrum-sizes", "64", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # main() configures this process's threads too
    report = json.loads(out.read_text())
    assert report["cases"] == [] and len(report["spectrum_cases"]) == 1
    (c,) = report["spectrum_cases"]
    assert "error" not in c, c
    inter = 64 * round(64 * 8 / 3 / 64)
    assert c["layers"] == memory.LAYERS * len(memory.TARGETS)
    assert c["largest_layer_bytes"] == inter * 64 * 4
    assert c["spectrum_peak_rss_bytes"] > 0 and c["adapters_bytes"] >= 0
    assert c["ratio"] == pytest.approx(c["spectrum_peak_rss_bytes"] / c["largest_layer_bytes"])
    expected = (c["spectrum_peak_rss_bytes"] - c["adapters_bytes"]) / c["largest_layer_bytes"]
    assert c["ratio_without_adapters"] == pytest.approx(expected)


def test_randlora_spectra_come_from_its_factors(case):
    """RandLoRA's ΔW is analysed from its scaled bases (ΔW = second·first·s, never formed): the factors equal
    peft's merged update, and its singular values match numpy's SVD of the dense peft-merged ΔW."""
    from landscape.spectrum import LowRank
    from landscape.spectrum.updates import lazy_deltas, randlora_factors

    folder, base = case
    sol = solutions_of(folder, base, ("randlora",))["randlora"]
    factors = randlora_factors(sol)
    assert len(factors) == 2 * len(TARGETS)
    lazy = lazy_deltas(sol)
    assert all(isinstance(lazy[n], LowRank) and lazy[n].kind == "randlora" for n in factors)
    w0s = dict(base.named_parameters())
    merged = merged_weights(folder, base, "randlora")
    result = analyse_solutions({"randlora": sol}, progress=False)
    assert result["settings"]["lora_rank"] is None  # RandLoRA's K = bases × r is no LoRA rank
    for layer in result["layers"]:
        name = layer["name"]
        dense = merged[name].double() - w0s[name].detach().double()
        torch.testing.assert_close(factors[name].dense().double(), dense, rtol=1e-4, atol=1e-6)
        s_ref = np.linalg.svd(dense.numpy(), compute_uv=False)
        got = np.asarray(layer["randlora"]["singular_values"])
        top = s_ref > 1e-3 * s_ref[0]
        np.testing.assert_allclose(got[top], s_ref[top], rtol=1e-5)
        assert np.abs(got - s_ref).max() <= 1e-5 * s_ref[0]
