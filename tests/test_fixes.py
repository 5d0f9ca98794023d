"""Regression tests of fixed faults, each through the command line where it can be reached there.

- training resume: a checkpoint is resumed only by a run with the same training key (ranks, sizes, ...);
- the checkpoint outlives training until the solution folder is saved;
- the 1-D paths are evaluated in the run's --dtype, like the plane;
- landscape.json's bf16 check compares the bf16 error with the smallest vertex-loss gap;
- torchrun on the CPU joins a gloo process group even where CUDA exists.

One tiny finished run (bf16 landscape on the CPU) is shared; the other runs reuse its solutions where
their training key is the same, so only what a test is about is trained again. No assertion here reads a
figure: figures are built but not drawn (tests.nodraw).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adapters.solution
import adapters.train
from landscape import build, connectivity
from tests import nodraw, procs

SOLUTIONS = ("ft", "lora", "randlora")
PAIRS = (("ft", "lora"), ("ft", "randlora"), ("lora", "randlora"))
# 60 steps: a checkpoint is written at step 50 (every 50 steps) before training ends.
TINY = ["--model", "tiny-bert", "--train-steps", "60", "--batch-size", "8", "--grid", "3", "--eval-samples", "16",
        "--path-points", "3", "--train-per-class", "12", "--test-per-class", "4", "--dtype", "bfloat16",
        "--device", "cpu", "--no-progress"]  # fmt: skip


class Stop(BaseException):
    """Ends a reference run once the solution a test compares is saved (the later stages are not needed)."""


class SaveFailed(Exception):
    pass


def argv(wordnet_root, out, *extra) -> list[str]:
    return ["--dataset", "wordnet", "--data-root", str(wordnet_root), "--out", str(out), *TINY, *extra]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a solution folder's safetensors files, by file and name."""
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs between {a} and {b}"


def copy_solutions(src: Path, dst: Path, methods) -> None:
    for m in methods:
        shutil.copytree(src / "solutions" / m, dst / "solutions" / m)


def checkpoints(out: Path, method: str) -> list[Path]:
    return sorted((out / "solutions").glob(f".{method}*.ckpt"))


def patch_save_solution(monkeypatch, wrap) -> None:
    """Replace adapters.solution.save_solution (also where the code before the fix imported it by name)."""
    fake = wrap(adapters.solution.save_solution)
    monkeypatch.setattr(adapters.solution, "save_solution", fake)
    if hasattr(connectivity, "save_solution"):
        monkeypatch.setattr(connectivity, "save_solution", fake)


def stop_after_saving(monkeypatch, method: str) -> None:
    def wrap(real):
        def save(folder, *args, **kwargs):
            real(folder, *args, **kwargs)
            if Path(folder).name == method:
                raise Stop

        return save

    patch_save_solution(monkeypatch, wrap)


def stop(*args, **kwargs):
    raise Stop


def count_steps(monkeypatch) -> list[int]:
    """Counts optimizer steps: training clips the gradient norm once per step."""
    calls = []
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The runs here use one CPU thread (OMP_NUM_THREADS is the runs' default thread count): the tiny model
    gains nothing from more, and no idle OpenMP thread spins beside it on a busy machine. The tests after
    these get the thread count back."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def figures_not_drawn():
    with nodraw.figures_not_drawn():
        yield


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, wordnet_root):
    out = tmp_path_factory.mktemp("fixes") / "run"
    assert connectivity.main(argv(wordnet_root, out)) == 0
    return out


# ----------------------------------------------------------------------------- 1. resume only the same key


def die_after_lora_checkpoint() -> None:
    """In a child process, before the run: SIGKILL itself right after LoRA's first training checkpoint is written."""
    real = adapters.train._save_checkpoint

    def save_then_die(path, *args, **kwargs):
        real(path, *args, **kwargs)
        if Path(path).name.startswith(".lora"):
            os.kill(os.getpid(), signal.SIGKILL)

    adapters.train._save_checkpoint = save_then_die


@pytest.fixture(scope="module")
def killed_mid_lora(run_dir, wordnet_root, tmp_path_factory):
    """A run SIGKILLed right after LoRA's step-50 checkpoint (head-only, FT and RandLoRA already saved)."""
    out = tmp_path_factory.mktemp("killed") / "run"
    copy_solutions(run_dir, out, ("head_only", "ft", "randlora"))  # same training key: reused
    log = out.with_name("killed.log")  # a process of its own, forked from a preloaded server (tests.procs)
    code = procs.run(argv(wordnet_root, out), log, env={"OMP_NUM_THREADS": "1"}, draw=False,
                     patch=f"{__name__}:die_after_lora_checkpoint")  # fmt: skip
    assert code == -signal.SIGKILL, log.read_text()[-3000:]
    assert checkpoints(out, "lora") and not (out / "solutions" / "lora").exists()
    return out


def rerun_after_kill(killed: Path, tmp_path: Path, wordnet_root, capsys, monkeypatch, *changed, whole: bool) -> Path:
    """The killed run's folder run again with other settings: the whole run (exit 0, no traceback), or up
    to the saved LoRA solution."""
    out = tmp_path / "rerun"
    shutil.copytree(killed, out)
    capsys.readouterr()
    if whole:
        assert connectivity.main(argv(wordnet_root, out, *changed)) == 0
    else:
        with monkeypatch.context() as mp:
            stop_after_saving(mp, "lora")
            with pytest.raises(Stop):
                connectivity.main(argv(wordnet_root, out, *changed))
    assert "Traceback" not in capsys.readouterr().err
    return out


def uninterrupted_lora(solutions_from: Path, tmp_path: Path, wordnet_root, monkeypatch, reuse, *changed) -> Path:
    """The LoRA solution of a run with ``changed`` settings, trained uninterrupted in a fresh folder (the
    ``reuse`` solutions, of the same training key, copied from ``solutions_from``)."""
    out = tmp_path / "fresh"
    copy_solutions(solutions_from, out, reuse)
    with monkeypatch.context() as mp:
        stop_after_saving(mp, "lora")
        with pytest.raises(Stop):
            connectivity.main(argv(wordnet_root, out, *changed))
    return out / "solutions" / "lora"


def test_killed_run_rerun_with_another_lora_rank_trains_afresh(
    killed_mid_lora, run_dir, wordnet_root, tmp_path, capsys, monkeypatch
):
    """Before the fix the rank-4 checkpoint was loaded into the rank-2 adapter: a shape-mismatch traceback."""
    changed = ("--lora-rank", "2")
    rerun = rerun_after_kill(killed_mid_lora, tmp_path, wordnet_root, capsys, monkeypatch, *changed, whole=True)
    assert json.loads((rerun / "solutions" / "lora" / "solution.json").read_text())["rank"] == 2
    fresh = uninterrupted_lora(run_dir, tmp_path, wordnet_root, monkeypatch, ("head_only", "ft", "randlora"), *changed)
    assert_same_weights(rerun / "solutions" / "lora", fresh)
    # the killed run's checkpoint is another configuration's: left alone (the rerun's own is removed once saved)
    assert [p.name for p in checkpoints(rerun, "lora")] == [p.name for p in checkpoints(killed_mid_lora, "lora")]


def test_killed_run_rerun_with_other_data_sizes_does_not_resume(
    killed_mid_lora, wordnet_root, tmp_path, capsys, monkeypatch
):
    """Before the fix the checkpoint of the 12-per-class run was silently resumed by the 10-per-class run."""
    changed = ("--train-per-class", "10")
    rerun = rerun_after_kill(killed_mid_lora, tmp_path, wordnet_root, capsys, monkeypatch, *changed, whole=False)
    # head-only and FT of the new sizes were trained by the rerun before LoRA: the fresh run reuses them
    fresh = uninterrupted_lora(rerun, tmp_path, wordnet_root, monkeypatch, ("head_only", "ft"), *changed)
    assert_same_weights(rerun / "solutions" / "lora", fresh)
    killed = checkpoints(killed_mid_lora, "lora")[0]
    assert (rerun / "solutions" / killed.name).read_bytes() == killed.read_bytes()  # another run's: left alone


# ----------------------------------------------------------------------------- 2. checkpoint kept until saved


def test_failed_save_resumes_at_the_last_step_without_retraining(run_dir, wordnet_root, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    shutil.rmtree(out / "solutions" / "randlora")  # the last solution of the run is trained again

    def wrap(real):
        def save(folder, *args, **kwargs):
            if Path(folder).name == "randlora":
                raise SaveFailed("disk full")
            real(folder, *args, **kwargs)

        return save

    with monkeypatch.context() as mp:
        patch_save_solution(mp, wrap)
        trained = count_steps(mp)
        with pytest.raises(SaveFailed):
            connectivity.main(argv(wordnet_root, out))
    assert len(trained) == 60 and not (out / "solutions" / "randlora").exists()
    assert checkpoints(out, "randlora"), "the checkpoint was deleted before the solution was saved"

    steps = count_steps(monkeypatch)
    with monkeypatch.context() as mp:
        mp.setattr(build, "solution_weights", stop)  # the plane stage, after all training and saving
        with pytest.raises(Stop):
            connectivity.main(argv(wordnet_root, out))
    assert len(steps) == 0, f"the rerun trained {len(steps)} steps again instead of resuming at the last step"
    assert_same_weights(out / "solutions" / "randlora", run_dir / "solutions" / "randlora")
    assert not checkpoints(out, "randlora")  # removed once the solution is saved


# ----------------------------------------------------------------------------- 4, 5. precision


def test_paths_run_in_the_runs_dtype(run_dir):
    """The paths' endpoints are the solutions: with --dtype bfloat16 their losses are the plane's vertex losses."""
    meta = json.loads((run_dir / "landscape.json").read_text())
    pairs = json.loads((run_dir / "paths.json").read_text())["pairs"]
    vertex = {s: meta["solutions"][s]["vertex_loss"] for s in SOLUTIONS}
    for a, b in PAIRS:
        pair = pairs[f"{a}-{b}"]
        assert (pair["loss_t0"], pair["loss_t1"]) == (vertex[a], vertex[b]), f"{a}-{b}"


def test_bf16_check_compares_the_error_with_the_smallest_vertex_gap(run_dir):
    meta = json.loads((run_dir / "landscape.json").read_text())
    assert meta["dtype"] == "bfloat16"
    check, bf16 = meta["bf16_check"], {s: meta["solutions"][s]["vertex_loss"] for s in SOLUTIONS}
    gap = min(abs(bf16[a] - bf16[b]) for a, b in PAIRS)
    assert check["smallest_vertex_loss_gap"] == pytest.approx(gap, rel=1e-12)

    # The vertices in bf16 and fp32, evaluated here independently of the run.
    from landscape.engine.grid import PlaneEvaluator
    from landscape.engine.plane import build_chart, solution_weights
    from landscape.run import open_run

    run = open_run(run_dir)
    thetas = solution_weights(dict(run.base.named_parameters()), {s: run.solutions[s].delta() for s in SOLUTIONS})
    chart = build_chart(meta["chart"], thetas)
    loss = {}
    for dtype in ("bfloat16", "float32"):
        evaluator = PlaneEvaluator(copy.deepcopy(run.base), chart, run.eval_set, "cpu", dtype=dtype,
                                   objective=run.loaded.task.objective)  # fmt: skip
        loss[dtype] = {s: evaluator.evaluate(*chart.vertices[s]).loss for s in SOLUTIONS}
    assert loss["bfloat16"] == pytest.approx(bf16, rel=1e-9)
    assert check["vertex_loss_fp32"] == pytest.approx(loss["float32"], rel=1e-9)
    diff = max(abs(loss["bfloat16"][s] - loss["float32"][s]) for s in SOLUTIONS)
    assert diff > 0  # bf16 rounding is visible at these losses
    assert check["max_abs_diff_bf16_vs_fp32"] == pytest.approx(diff, abs=1e-8)
    assert check["bf16_below_smallest_gap"] is (diff < gap)


# ----------------------------------------------------------------------------- 8. process-group backend


class Joined(Exception):
    pass


def test_torchrun_on_the_cpu_joins_gloo_even_where_cuda_exists(monkeypatch, wordnet_root, tmp_path):
    import torch.distributed as dist

    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    backends = []

    def init_process_group(backend=None, *args, **kwargs):
        backends.append(backend)
        raise Joined

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    with pytest.raises(Joined):
        connectivity.main(argv(wordnet_root, tmp_path / "out"))
    assert backends == ["gloo"]
