"""Similarity to full fine-tuning, intruder dimensions, the LoRA fast path, the Gram method and the CLI."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch

from landscape import spectrum
from landscape.spectrum import (
    LowRank,
    analyse,
    decomposition,
    intruder_cosines,
    lowrank_svd,
    overlap_curve,
    principal_angles,
)
from tests import nodraw


def orthonormal(rng, m, k):
    return np.linalg.qr(rng.standard_normal((m, k)))[0]


def test_principal_angles_match_scipy():
    rng = np.random.default_rng(0)
    for m, ka, kb in [(30, 4, 4), (50, 3, 7), (40, 9, 2), (20, 1, 1)]:
        qa, qb = orthonormal(rng, m, ka), orthonormal(rng, m, kb)
        ref = np.sort(np.degrees(scipy.linalg.subspace_angles(qa, qb)))
        np.testing.assert_allclose(principal_angles(qa, qb), ref, atol=1e-10)
    # nearly identical subspaces: small angles must stay accurate (arccos alone would not)
    qa = orthonormal(rng, 40, 5)
    qb = np.linalg.qr(qa + 1e-7 * rng.standard_normal(qa.shape))[0]
    ref = np.sort(np.degrees(scipy.linalg.subspace_angles(qa, qb)))
    np.testing.assert_allclose(principal_angles(qa, qb), ref, rtol=1e-6, atol=1e-12)
    assert principal_angles(qa, qa).max() < 1e-6


def test_overlap_curve_against_direct_numpy():
    rng = np.random.default_rng(1)
    ua, ub = orthonormal(rng, 50, 12), orthonormal(rng, 50, 12)
    direct = [np.linalg.norm(ua[:, :k].T @ ub[:, :k]) ** 2 / k for k in range(1, 13)]
    np.testing.assert_allclose(overlap_curve(ua, ub, 12), direct, rtol=1e-12)
    np.testing.assert_allclose(overlap_curve(ua, ua, 12), np.ones(12), rtol=1e-12)
    # a rank-3 update: its subspace stops growing at k = 3
    trunc = [np.linalg.norm(ua[:, : min(k, 3)].T @ ub[:, :k]) ** 2 / k for k in range(1, 13)]
    np.testing.assert_allclose(overlap_curve(ua, ub, 12, rank_a=3), trunc, rtol=1e-12)


def _match_up_to_sign(u, v, atol):
    signs = np.sign(np.sum(u * v, axis=0))
    np.testing.assert_allclose(u * signs, v, atol=atol)


@pytest.mark.parametrize("m,n,r", [(80, 30, 4), (20, 70, 6), (25, 25, 25)])
def test_lora_fast_path_equals_dense_svd(m, n, r):
    g = torch.Generator().manual_seed(m)
    B, A, scale = (
        torch.randn(m, r, generator=g, dtype=torch.float64),
        torch.randn(r, n, generator=g, dtype=torch.float64),
        0.7,
    )
    u, s, v = lowrank_svd(B, A, scale)
    dense = (scale * B @ A).numpy()
    ud, sd, vdh = np.linalg.svd(dense, full_matrices=False)
    np.testing.assert_allclose(s.numpy(), sd[:r], rtol=1e-10)
    np.testing.assert_allclose(sd[r:], 0, atol=1e-10 * sd[0])
    _match_up_to_sign(u.numpy(), ud[:, :r], atol=1e-8)
    _match_up_to_sign(v.numpy(), vdh[:r].T, atol=1e-8)
    # through analyse: factors and the dense matrix give the same metrics
    low = LowRank(B.float(), A.float(), scale)
    out = analyse({"lora": {"w": low}, "dense": {"w": low.dense()}}, progress=False)["layers"][0]
    np.testing.assert_allclose(out["lora"]["singular_values"], out["dense"]["singular_values"], rtol=1e-4, atol=1e-5)
    assert out["lora"]["rank"] == out["dense"]["rank"] == min(r, m, n)


@pytest.mark.parametrize("shape", [(90, 30), (30, 90), (40, 40)])
def test_gram_and_svd_methods_agree_with_numpy(shape):
    rng = np.random.default_rng(2)
    d = min(shape)
    s_true = np.logspace(0, -4, d)  # condition number 1e4
    x = (orthonormal(rng, shape[0], d) * s_true) @ orthonormal(rng, shape[1], d).T
    x = torch.from_numpy(x.astype(np.float32))
    ref_u, ref_s, _ = np.linalg.svd(x.numpy().astype(np.float64), full_matrices=False)
    for method in ("gram", "svd"):
        dec = decomposition.decompose(x[None], 5, method)
        np.testing.assert_allclose(dec.s[0].numpy(), ref_s, rtol=1e-4, atol=1e-6)
        _match_up_to_sign(dec.left(5)[0].numpy(), ref_u[:, :5], atol=1e-4)


def test_energy_beyond_rank_and_streaming():
    g = torch.Generator().manual_seed(3)
    names = [f"blocks.{i}.w" for i in range(5)]
    shapes = {n: (12, 8) if i % 2 else (8, 16) for i, n in enumerate(names)}
    deltas = {s: {n: torch.randn(*shapes[n], generator=g) for n in names} for s in ("ft", "lora", "randlora")}
    base = {n: torch.randn(*shapes[n], generator=g) for n in names}
    big = analyse(deltas, progress=False, base=base, rank=3)
    small = analyse(deltas, progress=False, base=base, rank=3, chunk_bytes=1)  # one layer at a time
    assert big == small
    assert [e["name"] for e in big["layers"]] == names
    for e in big["layers"]:
        s = np.linalg.svd(deltas["randlora"][e["name"]].numpy().astype(np.float64), compute_uv=False)
        assert e["randlora"]["energy_beyond_rank"] == pytest.approx(np.sum(s[3:] ** 2) / np.sum(s**2), rel=1e-5)
        sim = e["lora"]["similarity_to_ft"]
        assert set(sim["principal_angles_deg"]) == {"1", "3", "4"} | ({"16"} if min(e["shape"]) >= 16 else set())
        assert len(sim["overlap"]) == min(64, *e["shape"])
        assert "similarity_to_ft" not in e["ft"]
        assert len(e["ft"]["intruders"]["max_cos"]) == min(10, *e["shape"])


def _known_base(rng, m=60, n=20):
    u0, v0 = orthonormal(rng, m, n), orthonormal(rng, n, n)
    s0 = np.linspace(10, 1, n)
    s0[-1] = 1e-3
    return u0, s0, v0


def test_planted_intruder_is_counted_and_aligned_update_is_not():
    rng = np.random.default_rng(4)
    m, n = 60, 20
    u0, s0, v0 = _known_base(rng, m, n)
    w0 = (u0 * s0) @ v0.T
    x = rng.standard_normal(m)
    x -= u0 @ (u0.T @ x)  # orthogonal to every left singular vector of W0
    x /= np.linalg.norm(x)
    planted = 30.0 * np.outer(x, v0[:, -1])  # larger than W0's top singular value
    aligned = 5.0 * np.outer(u0[:, 0], v0[:, 0])  # along W0's top direction

    t = lambda a: torch.from_numpy(a.astype(np.float32))  # noqa: E731
    for method in ("gram", "svd"):
        cos = intruder_cosines(t(w0), t(w0 + planted), method=method)
        assert cos[0] < 1e-3 and np.all(cos[1:] > 0.99)
        assert np.all(intruder_cosines(t(w0), t(w0 + aligned), method=method) > 0.99)

    deltas = {"ft": {"w": t(aligned)}, "lora": {"w": t(planted)}}
    out = analyse(deltas, progress=False, base={"w": t(w0)})["layers"][0]
    assert out["lora"]["intruders"]["count"] == {"0.3": 1, "0.5": 1, "0.7": 1}
    assert out["ft"]["intruders"]["count"] == {"0.3": 0, "0.5": 0, "0.7": 0}


def test_intruder_cosines_match_the_direct_definition():
    # peft's reduce_intruder_dimension: max over W0's left vectors of |U_mergedᵀ U_base|, top 10
    rng = np.random.default_rng(5)
    for m, n in [(50, 20), (20, 50), (150, 60), (60, 150)]:  # d >= 40: the partial (top-10 only) eigensolver
        w0 = rng.standard_normal((m, n))
        w = w0 + 0.8 * rng.standard_normal((m, n))
        u0 = np.linalg.svd(w0, full_matrices=False)[0]
        u1 = np.linalg.svd(w, full_matrices=False)[0]
        ref = np.abs(u1[:, :10].T @ u0).max(axis=1)
        got = intruder_cosines(torch.from_numpy(w0.astype(np.float32)), torch.from_numpy(w.astype(np.float32)))
        np.testing.assert_allclose(got, ref, atol=2e-4)


def test_lowrank_and_dense_lora_give_the_same_intruders_and_similarity():
    g = torch.Generator().manual_seed(6)
    for m, n in [(90, 50), (50, 90)]:
        w0 = torch.randn(m, n, generator=g)
        low = LowRank(torch.randn(m, 4, generator=g), torch.randn(4, n, generator=g), 1.5)
        ft = torch.randn(m, n, generator=g)
        for method in ("gram", "svd"):
            fast = analyse({"ft": {"w": ft}, "lora": {"w": low}}, progress=False, base={"w": w0}, method=method)
            slow = analyse({"ft": {"w": ft}, "lora": {"w": low.dense()}}, progress=False, base={"w": w0}, rank=4,
                           method=method)  # fmt: skip
            a, b = fast["layers"][0]["lora"], slow["layers"][0]["lora"]
            np.testing.assert_allclose(a["intruders"]["max_cos"], b["intruders"]["max_cos"], atol=1e-4)
            sa, sb = a["similarity_to_ft"], b["similarity_to_ft"]
            np.testing.assert_allclose(sa["overlap"], sb["overlap"], atol=1e-4)
            for k in sa["principal_angles_deg"]:
                np.testing.assert_allclose(sa["principal_angles_deg"][k], sb["principal_angles_deg"][k], atol=1e-2)


# --------------------------------------------------------------------------------- CLI ----

NUM_CLASSES = 8


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_entry):
    """A run folder with ft / lora / randlora solutions of tiny-bert, written by save_solution.

    Instead of training (slow), every trainable tensor is perturbed at random: the spectra
    only need updates of the right structure (LoRA: B·A of rank r; RandLoRA: peft's formula).
    """
    from tests.synthetic import save_perturbed_solutions

    out = tmp_path_factory.mktemp("spec_run")
    base = tiny_entry.build(NUM_CLASSES)
    save_perturbed_solutions(base, tiny_entry, out / "solutions", NUM_CLASSES, 0.05)
    # what --run reads of a run's landscape.json: the solutions it was given (none: its own solutions/)
    (out / "landscape.json").write_text(json.dumps({"config": {"solutions": {}}}))
    return out


def _spectrum_main(argv) -> tuple[int, list[str]]:
    """landscape.spectrum.main and the lines it printed."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = spectrum.main(argv)
    return code, buf.getvalue().splitlines()


@pytest.fixture(scope="module")
def given_spectrum(tiny_run, tmp_path_factory):
    """The CLI on the three solutions given one by one: (out folder, printed lines)."""
    out = tmp_path_factory.mktemp("given")
    sols = tiny_run / "solutions"
    code, lines = _spectrum_main(
        ["--solution", *(f"{n}={sols / n}" for n in ("ft", "lora", "randlora")), "--out", str(out), "--no-progress"]
    )
    assert code == 0
    return out, lines


def test_lora_factors_reproduce_peft_delta(tiny_run):
    from adapters.solution import load_solution

    sol = load_solution(tiny_run / "solutions" / "lora")
    factors = spectrum.lora_factors(sol)
    assert factors
    for name, low in factors.items():
        torch.testing.assert_close(low.dense(), sol.delta()[name], rtol=1e-5, atol=1e-7)
        assert low.r == sol.info["rank"]


def test_cli_solution_options_and_outputs(tiny_run, given_spectrum, tmp_path):
    sols = tiny_run / "solutions"
    out_run, (out_given, printed) = tmp_path / "run", given_spectrum
    with nodraw.figures_not_drawn():  # only its spectrum.json is read
        assert spectrum.main(["--run", str(tiny_run), "--out", str(out_run), "--no-progress"]) == 0
    for name in spectrum.OUTPUTS:
        assert (out_given / name).stat().st_size > 0, name
    # the message lists exactly the files written (with an FT reference: the similarity figures too)
    assert printed[-1] == "wrote " + ", ".join(str(out_given / name) for name in spectrum.OUTPUTS)
    spec = json.loads((out_given / "spectrum.json").read_text())
    assert spec["layers"] == json.loads((out_run / "spectrum.json").read_text())["layers"]
    r = spec["settings"]["lora_rank"]
    assert r == json.loads((sols / "lora" / "solution.json").read_text())["rank"]
    layer = spec["layers"][0]
    for sol in ("ft", "lora", "randlora"):
        assert {"singular_values", "rank", "effective_rank", "energy_beyond_rank", "intruders"} <= set(layer[sol])
    assert layer["lora"]["energy_beyond_rank"] == pytest.approx(0.0, abs=1e-6)  # rank-r update
    assert str(min(r, *layer["shape"])) in layer["randlora"]["similarity_to_ft"]["principal_angles_deg"]
    rows = list(csv.DictReader((out_given / "spectrum.csv").open()))
    assert len(rows) == 3 * len(spec["layers"])
    assert {"layer", "solution", "effective_rank", "energy_beyond_rank", f"overlap_k{r}", "intruders_eps0.5"} <= set(
        rows[0]
    )

    # a bare peft adapter folder (adapter_config.json, no solution.json) with --base / --num-classes
    bare = tmp_path / "bare_lora"
    shutil.copytree(sols / "lora", bare)
    (bare / "solution.json").unlink()
    argv = ["--solution", f"ft={sols / 'ft'}", f"lora={bare}", "--out", str(tmp_path / "bare"), "--no-progress"]
    with nodraw.figures_not_drawn():  # only its spectrum.json is read
        assert spectrum.main([*argv, "--base", "tiny-bert", "--num-classes", "8"]) == 0
    bare_spec = json.loads((tmp_path / "bare" / "spectrum.json").read_text())
    lora_layers = [e["lora"]["singular_values"] for e in bare_spec["layers"]]
    assert lora_layers == [e["lora"]["singular_values"] for e in spec["layers"]]


def test_cli_bad_solution_inputs_exit_2(tiny_run, tmp_path, capsys):
    sols = tiny_run / "solutions"
    bare = tmp_path / "bare"
    shutil.copytree(sols / "lora", bare)
    (bare / "solution.json").unlink()
    cases = [
        (["--solution", f"lora={bare}", "--out", str(tmp_path / "o1")], "--base MODEL_NAME"),
        (["--solution", "lora", "--out", str(tmp_path / "o2")], "NAME=PATH"),
        (["--solution", f"ft={tmp_path / 'nope'}", "--out", str(tmp_path / "o3")], "does not exist"),
        (["--solution", f"ft={sols / 'ft'}"], "--out"),
        (["--solution", f"ft={sols / 'ft'}", f"ft={sols / 'lora'}", "--out", str(tmp_path / "o4")], "given twice"),
        (["--solution", f"ft={sols / 'ft'}", "--run", str(tiny_run)], "not both"),
        (["--run", str(sols)], "no landscape.json"),
        ([], "--run DIR"),
    ]
    for argv, message in cases:
        assert spectrum.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_without_ft_no_similarity_is_written_or_claimed(tiny_run, tmp_path, no_figure_drawing):
    sols = tiny_run / "solutions"
    out = tmp_path / "no_ft"
    code, printed = _spectrum_main(
        ["--solution", f"lora={sols / 'lora'}", f"randlora={sols / 'randlora'}", "--out", str(out), "--no-progress"]
    )
    assert code == 0
    names = ["spectrum.json", "spectrum.csv", "spectrum.png", "rank.png", "rank.pdf"]
    assert printed[-1] == "wrote " + ", ".join(str(out / name) for name in names)
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    assert json.loads((out / "spectrum.json").read_text())["settings"]["reference"] is None


def test_write_spectrum_returns_the_paths_it_wrote(tiny_run, tmp_path, no_figure_drawing):
    from adapters.solution import load_solutions

    sols = tiny_run / "solutions"
    solutions = load_solutions({n: sols / n for n in ("ft", "randlora")})
    written = spectrum.write_spectrum(solutions, tmp_path, progress=False)
    assert written == [tmp_path / name for name in spectrum.OUTPUTS]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(spectrum.OUTPUTS)


def test_analyse_solutions_gives_what_the_cli_writes(tiny_run, given_spectrum):
    """The Python API: the same layers (adapted ones, head excluded), rank, reference and values as spectrum.json."""
    from adapters.models.base import HEAD
    from adapters.solution import load_solutions
    from landscape.spectrum.updates import default_layers

    sols = tiny_run / "solutions"
    solutions = load_solutions({n: sols / n for n in ("ft", "lora", "randlora")})
    result = spectrum.analyse_solutions(solutions, progress=False)
    assert json.loads(json.dumps(result)) == json.loads((given_spectrum[0] / "spectrum.json").read_text())
    deltas = {name: sol.delta() for name, sol in solutions.items()}
    names = [layer["name"] for layer in result["layers"]]
    assert names == spectrum.adapted_layers(deltas)
    assert [n for n in default_layers(deltas) if n not in names] == [f"{HEAD}.weight"]  # the head only
    assert result["settings"]["lora_rank"] == 4 and result["settings"]["reference"] == "ft"
    assert result["settings"]["intruders"] is not None
    assert all("energy_beyond_rank" in layer["randlora"] and "intruders" in layer["randlora"]
               for layer in result["layers"])  # fmt: skip


def test_spectrum_of_a_run_made_with_solutions(tiny_wordnet_run, wordnet_root, tmp_path, no_figure_drawing):
    """--run on a run whose solutions were given with --solutions (those of conftest's finished tiny run): it
    has no solutions/ folder for them, its landscape.json records where they are."""
    from landscape import connectivity
    from tests.conftest import TINY_RUN

    first, second, out = tiny_wordnet_run, tmp_path / "second", tmp_path / "spectrum"
    common = ["--dataset", "wordnet", "--data-root", str(wordnet_root), *TINY_RUN, "--path-points", "0"]
    folders = {n: first / "solutions" / n for n in ("ft", "lora", "randlora")}
    given = [f"{n}={p}" for n, p in folders.items()]
    assert connectivity.main([*common, "--out", str(second), "--solutions", *given]) == 0
    assert not (second / "solutions" / "ft").exists()

    code, printed = _spectrum_main(["--run", str(second), "--out", str(out), "--no-progress"])
    assert code == 0
    assert printed[-1] == "wrote " + ", ".join(str(out / name) for name in spectrum.OUTPUTS)
    spec = json.loads((out / "spectrum.json").read_text())
    assert {n: s["path"] for n, s in spec["solutions"].items()} == {n: str(p) for n, p in folders.items()}
    assert spec["layers"] == json.loads((first / "spectrum.json").read_text())["layers"]


# ------------------------------------------------------- CPU path: LAPACK computing only what is needed ----


def _sym(rng, d, kind, dtype):
    if kind == "random":
        x = rng.standard_normal((3 * d, d))
        g = x.T @ x
    elif kind == "rank3":  # a cluster of zero eigenvalues, as for a dense rank-r update
        x = rng.standard_normal((d, 3))
        g = x @ x.T
    elif kind == "identity":  # one fully degenerate cluster
        g = np.eye(d)
    else:
        g = np.zeros((d, d))
    return g.astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kind", ["random", "rank3", "identity", "zero"])
def test_lapack_eigh_matches_numpy(dtype, kind):
    rng = np.random.default_rng(7)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    for d in (1, 2, 3, 70):
        g = _sym(rng, d, kind, dtype)
        ref_lam, ref_vec = np.linalg.eigh(g.astype(np.float64))
        ref_lam, ref_vec = ref_lam[::-1], ref_vec[:, ::-1]
        scale = max(abs(ref_lam[0]), 1.0)
        for k in (0, 1, 10, d - 1, d, None):
            if k is not None and (k < 0 or k > d):
                continue
            for all_values in (True, False):
                upper_garbage = np.asfortranarray(g + np.triu(np.full((d, d), 7.0, dtype), 1))  # lower triangle only
                lam, vec = decomposition.lapack_eigh(upper_garbage, k, all_values=all_values)
                kk = d if k is None else k
                n_values = d if all_values or k in (0, None) or kk >= d else kk
                np.testing.assert_allclose(lam[:n_values], ref_lam[:n_values], atol=rtol * scale * 10)
                if kk == 0:
                    assert vec is None
                    continue
                assert vec.shape == (d, kk)
                # orthonormal eigenvectors of the right eigenvalues (any basis inside a degenerate cluster)
                np.testing.assert_allclose(vec.T @ vec, np.eye(kk), atol=100 * rtol)
                resid = g.astype(np.float64) @ vec - vec * ref_lam[:kk]
                assert np.abs(resid).max() <= 100 * rtol * scale
                if kind == "random":  # distinct eigenvalues: the vectors themselves, up to sign
                    _match_up_to_sign(vec, ref_vec[:, :kk], atol=1e-8 if dtype == np.float64 else 2e-3)


def test_lapack_eigh_implicit_vectors_and_projections():
    rng = np.random.default_rng(8)
    for d in (1, 2, 50):
        g = _sym(rng, d, "random", np.float64)
        ref_lam, ref_vec = np.linalg.eigh(g)
        lam, tri = decomposition.lapack_eigh_implicit(np.asfortranarray(np.tril(g) + np.triu(np.ones((d, d)), 1)))
        np.testing.assert_allclose(lam, ref_lam[::-1], rtol=1e-12, atol=1e-12 * ref_lam[-1])
        v = tri.vectors(d)
        _match_up_to_sign(v, ref_vec[:, ::-1], atol=1e-8)
        y = rng.standard_normal((d, 4))
        np.testing.assert_allclose(tri.vt(y), v.T @ y, atol=1e-12 * np.abs(y).max() * d)
        np.testing.assert_allclose(tri.apply_q(tri.apply_q(y, "T"), "N"), y, atol=1e-12)  # Q orthogonal


@pytest.mark.parametrize("shape", [(50, 20), (20, 50), (30, 30)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_syrk_gram_lower_triangle(shape, dtype):
    x = np.random.default_rng(9).standard_normal(shape).astype(dtype)
    ref = x.T @ x if shape[0] >= shape[1] else x @ x.T
    g = decomposition.syrk(x)
    assert g.dtype == dtype and g.shape == ref.shape
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(np.tril(g), np.tril(ref), rtol=rtol, atol=rtol * np.abs(ref).max())
    np.testing.assert_allclose(decomposition.symmetric(g), ref, rtol=rtol, atol=rtol * np.abs(ref).max())


@pytest.mark.parametrize("shape", [(120, 80), (80, 120), (90, 90)])
def test_lapack_and_torch_gram_paths_agree(shape):
    """The CPU path (LAPACK, only the needed eigenpairs) against the torch path (full eigh) used off the CPU."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, *shape, generator=g)
    u = torch.linalg.qr(torch.randn(2, shape[0], 10, generator=g, dtype=torch.float64))[0]
    d = min(shape)
    for vectors in (0, 5, 64, None):
        fast = decomposition.decompose(x, vectors, "gram", lapack=True)
        ref = decomposition.decompose(x, vectors, "gram", lapack=False)
        np.testing.assert_allclose(fast.s.numpy(), ref.s.numpy(), rtol=1e-10, atol=1e-12 * float(ref.s.max()))
        if vectors == 0:
            continue
        k = d if vectors is None else vectors
        for i in range(2):
            _match_up_to_sign(fast.left(k)[i].numpy(), ref.left(k)[i].numpy(), atol=1e-7)
        if vectors is None:  # |U0ᵀ u| against all vectors: W0's decomposition in the intruder test
            want = ref.abs_cos_with_left(u).numpy()
            np.testing.assert_allclose(fast.abs_cos_with_left(u).numpy(), want, atol=1e-9)
    np.testing.assert_allclose(
        decomposition.decompose(x, None, "gram", lapack=True).gram.numpy(),
        decomposition.decompose(x, None, "gram", lapack=False).gram.numpy(),
        rtol=1e-12,
    )
    fast = decomposition.decompose(x, 10, "gram", top_only=True, lapack=True)
    ref = decomposition.decompose(x, 10, "gram", top_only=True, lapack=False)
    np.testing.assert_allclose(fast.s[:, :10].numpy(), ref.s[:, :10].numpy(), rtol=1e-5)
    for i in range(2):
        _match_up_to_sign(fast.left(10)[i].numpy(), ref.left(10)[i].numpy(), atol=1e-4)


def _naive_reference(w0, deltas, rank, ks=(1, 4, 16)):
    """The definitions with numpy.linalg.svd on dense float64 matrices (as the benchmark's naive side)."""
    ks = sorted({*ks, rank})
    u0 = np.linalg.svd(w0, full_matrices=False)[0]
    out, lefts = {}, {}
    for sol, dw in deltas.items():
        u, s, _ = np.linalg.svd(dw, full_matrices=False)
        r = int(np.sum(s > s[0] * max(dw.shape) * np.finfo(np.float32).eps))
        lefts[sol] = u[:, : min(r, 64)]
        u1 = np.linalg.svd(w0 + dw, full_matrices=False)[0][:, :10]
        out[sol] = {"s": s, "rank": r, "max_cos": np.abs(u1.T @ u0).max(axis=1)}
    for sol in deltas:
        if sol != "ft":
            qa, qb = lefts[sol], lefts["ft"]
            out[sol]["angles"] = {k: principal_angles(qa[:, :k], qb[:, :k]) for k in ks}
            out[sol]["overlap"] = overlap_curve(qa, qb, min(64, *w0.shape))
    return out


@pytest.mark.parametrize("shape", [(200, 96), (96, 200), (100, 100)])
def test_analyse_cpu_path_matches_naive_numpy(shape):
    """Every metric of analyse (CPU: LAPACK, partial eigenpairs, implicit W0 vectors) against numpy SVDs."""
    m, n = shape
    g = torch.Generator().manual_seed(11)
    r = 8
    w0 = torch.randn(m, n, generator=g) / n**0.5
    w0 += (torch.randn(m, 4, generator=g) * torch.tensor([4.0, 3.0, 2.5, 2.0])) @ torch.randn(4, n, generator=g) / n
    task = 0.3 * torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g) / n**0.5
    low = LowRank(torch.randn(m, r, generator=g) * 0.1, torch.randn(r, n, generator=g) * 0.1, 2.0)
    deltas = {"ft": task + 1e-3 * torch.randn(m, n, generator=g), "lora": low,
              "randlora": 0.5 * task + 0.01 * torch.randn(m, n, generator=g)}  # fmt: skip
    dense = {k: (v.dense() if isinstance(v, LowRank) else v).double().numpy() for k, v in deltas.items()}
    ref = _naive_reference(w0.double().numpy(), dense, r)
    out = analyse({k: {"w": v} for k, v in deltas.items()}, progress=False, base={"w": w0}, rank=r)["layers"][0]
    for sol, want in ref.items():
        got = out[sol]
        s = np.asarray(got["singular_values"])
        assert np.abs(s - want["s"]).max() <= 1e-5 * want["s"][0]
        assert got["rank"] == want["rank"]
        np.testing.assert_allclose(got["intruders"]["max_cos"], want["max_cos"], atol=1e-4)
        if sol != "ft":
            sim = got["similarity_to_ft"]
            np.testing.assert_allclose(sim["overlap"], want["overlap"], atol=1e-6)
            for k, angles in want["angles"].items():
                np.testing.assert_allclose(sim["principal_angles_deg"][str(k)], angles, atol=1e-3)


def test_is_finite_fast_path_and_fallback():
    assert decomposition.is_finite(torch.ones(3, 3))
    assert decomposition.is_finite(torch.full((3, 3), 3e38))  # a sum overflowing to inf, every value finite
    for bad in (float("inf"), float("-inf"), float("nan")):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            t = torch.ones(4, 4, dtype=dtype)
            t[1, 2] = bad
            assert not decomposition.is_finite(t)
        low = LowRank(torch.ones(4, 2), torch.ones(2, 4))
        low.A[0, 1] = bad
        assert not decomposition.is_finite(low)


def test_convolution_updates_are_analysed_as_out_by_in_kh_kw():
    """A Conv2d ΔW (out, in, kh, kw) is the matrix (out, in·kh·kw): its spectrum equals numpy's on that matrix."""
    g = torch.Generator().manual_seed(0)
    base = {"conv.weight": torch.randn(8, 4, 3, 3, generator=g)}
    deltas = {s: {"conv.weight": 0.1 * torch.randn(8, 4, 3, 3, generator=g)} for s in ("ft", "lora", "randlora")}
    result = analyse(deltas, base=base, progress=False)
    (layer,) = result["layers"]
    assert layer["name"] == "conv.weight" and layer["shape"] == [8, 36]
    for s in ("ft", "lora", "randlora"):
        want = np.linalg.svd(deltas[s]["conv.weight"].reshape(8, 36).double().numpy(), compute_uv=False)
        np.testing.assert_allclose(layer[s]["singular_values"], want, rtol=1e-5, atol=1e-6)
