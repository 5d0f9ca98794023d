"""Fault injection on the main job: nothing lost, nothing silently wrong.

- SIGKILL at random moments of training, the grid and the paths; rerunning the same command after
  each kill ends with the numbers and the solution weights of an uninterrupted run, bit for bit.
- Truncated or overwritten checkpoints: a training checkpoint is ignored with a warning (that solution
  starts over, same weights); a grid rank file or a finished solution's weights stop the run with
  exit status 2 and one line naming the file and the fix; following the fix gives the same numbers.
- A full disk (ENOSPC at a write or at the rename): the file is the previous complete one or absent,
  no temporary file is left behind, and a rerun after freeing space gives the same numbers.
- NaN weights in a solution given with --solutions: exit status 2 and one line.

Every run here computes with one CPU thread, the uninterrupted reference in a process of its own, so
bit-equality does not depend on the machine. ``FAULT_SEEDS=0,1,2`` draws more kill schedules (default: 0).
The runs in processes of their own are forked from a server that has imported the toolkit (tests.procs):
real processes, really SIGKILLed, without paying 5-8 s of imports each. No assertion here reads a figure,
so figures are built but not drawn (tests.nodraw), in the children and in this process.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from landscape import connectivity
from tests import procs
from tests.conftest import reseal

METHODS = ("head_only", "ft", "lora", "randlora")
GRID = 7
# 60 steps: training checkpoints at steps 50 and 60 (checkpoints come every 50 steps and at the end), so a
# kill can land between two of them.
RUN = ["--model", "tiny-bert", "--train-steps", "60", "--batch-size", "8", "--grid", str(GRID),
       "--eval-samples", "96", "--path-points", "5", "--train-per-class", "12", "--test-per-class", "4",
       "--no-progress"]  # fmt: skip
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # of the runs in processes of their own
SEEDS = [int(s) for s in os.environ.get("FAULT_SEEDS", "0").split(",")]


class Crash(Exception):
    pass


def _argv(wordnet_root, out, *extra) -> list[str]:
    return ["--dataset", "wordnet", "--data-root", str(wordnet_root), "--out", str(out), *RUN, *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, wordnet_root) -> Path:
    """An uninterrupted run, in a process of its own."""
    out = tmp_path_factory.mktemp("reference") / "run"
    log = out.with_name("run.log")
    assert procs.run(_argv(wordnet_root, out), log, env=ENV, draw=False) == 0, log.read_text()[-3000:]
    return out


@pytest.fixture(autouse=True)
def _figures_not_drawn(no_figure_drawing):
    """The in-process runs too (see the module docstring)."""


@pytest.fixture
def one_thread(monkeypatch):
    """In-process runs compute like the reference's process: one thread."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same_results(out: Path, ref: Path) -> None:
    """landscape.npz, paths.npz and every solution's weights equal the reference's bit for bit."""
    for name in ("landscape.npz", "paths.npz"):
        with np.load(ref / name) as a, np.load(out / name) as b:
            assert sorted(a.files) == sorted(b.files), name
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")
    for method in METHODS:
        files = sorted(p.name for p in (ref / "solutions" / method).glob("*.safetensors"))
        assert files and files == sorted(p.name for p in (out / "solutions" / method).glob("*.safetensors")), method
        for name in files:
            a, b = load_file(ref / "solutions" / method / name), load_file(out / "solutions" / method / name)
            assert a.keys() == b.keys(), f"{method}/{name}"
            for key in a:
                assert torch.equal(a[key], b[key]), f"{method}/{name}: {key}"
        metrics = [json.loads((d / "solutions" / method / "metrics.json").read_text()) for d in (ref, out)]
        for key in ("test_accuracy", "test_loss", "steps"):
            assert metrics[0][key] == metrics[1][key], f"{method}: {key}"


def temp_files(out: Path) -> list[str]:
    """What an interrupted atomic write can leave: ``.<name>.<random>.tmp<suffix>`` files and
    ``.<folder>.tmp`` / ``.<folder>.old`` folders."""
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*") if ".tmp" in p.name or p.name.endswith(".old"))


def grid_points(out: Path) -> set[tuple[int, int]]:
    points: set[tuple[int, int]] = set()
    for path in (out / ".grid").glob("rank*.npz"):
        with np.load(path) as f:
            points |= set(zip(f["i"].tolist(), f["j"].tolist(), strict=True))
    return points


def one_line_exit_2(argv, capsys, *words: str) -> str:
    """The run exits with status 2, its error is one line holding ``words``, the last on stderr (before
    it only the run's progress lines), and there is no traceback."""
    capsys.readouterr()
    code = connectivity.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err and lines, err
    assert [line for line in lines if ": error: " in line] == lines[-1:], err
    for word in words:
        assert word in lines[-1], (word, lines[-1])
    return lines[-1]


# --------------------------------------------------------------------------------------------- SIGKILL


def _fresh(pattern: str, since: float):
    """A trigger: a file or folder matching ``pattern`` written since ``since`` (progress of this run)."""

    def fired(out: Path) -> bool:
        for path in out.glob(pattern):
            try:
                if path.stat().st_mtime >= since:
                    return True
            except FileNotFoundError:  # replaced meanwhile
                pass
        return False

    return fired


def _grid_grew(by: int, before: int):
    def fired(out: Path) -> bool:
        try:
            return len(grid_points(out)) >= before + by
        except (OSError, ValueError, zipfile.BadZipFile):  # replaced while np.load read it lazily
            return False

    return fired


def _stage(out: Path) -> str:
    """Where the run was when it was killed, from what it had written."""
    if not all((out / "solutions" / m / "solution.json").exists() for m in METHODS):
        return "train"
    if (out / "landscape.npz").exists():
        return "paths"  # landscape.npz is written when the grid is done, before the paths
    return "grid" if grid_points(out) else "plane"


def _check_complete_files(out: Path) -> None:
    """Every file the killed run left under its real name is complete (the writes are atomic)."""
    for path in (out / "solutions").glob(".*.ckpt"):
        if ".tmp" not in path.name:
            torch.load(path, map_location="cpu", weights_only=True)
    for method in METHODS:
        folder = out / "solutions" / method
        if folder.exists():
            assert (folder / "solution.json").exists() and (folder / "metrics.json").exists(), folder
            for weights in folder.glob("*.safetensors"):
                load_file(weights)
    grid_points(out)
    if (out / "landscape.npz").exists():
        with np.load(out / "landscape.npz") as f:
            assert f["loss"].shape == (GRID, GRID)


@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_at_random_moments_then_rerun_equals_uninterrupted(reference, wordnet_root, tmp_path, seed):
    rng = random.Random(seed)
    seconds = json.loads((reference / "landscape.json").read_text())["wall_time_s"]
    out = tmp_path / "run"
    argv = _argv(wordnet_root, out)

    # (a trigger: progress of this run, then a random delay within the stage it fired in, as measured in the
    # reference run): in training, after a checkpoint and before about the next one (10 of 60 steps later)
    def training(method: str):
        return lambda t: (_fresh(f"solutions/.{method}*.ckpt", t), rng.random() * seconds[f"train_{method}"] * 10 / 60)

    plan = [
        training("head_only"),
        training("ft"),
        training("randlora"),
        lambda t: (_grid_grew(rng.randint(2, 15), len(grid_points(out))), 0.0),
        lambda t: (_grid_grew(rng.randint(2, 15), len(grid_points(out))), 0.0),
        lambda t: (_fresh("landscape.npz", t), rng.random() * 0.7 * seconds["paths"]),
    ]
    stages, saved = [], set()
    for k, step in enumerate(plan):
        start = time.time()
        trigger, delay = step(start)
        proc = procs.start(argv, tmp_path / f"run{k}.log", env=ENV, draw=False)
        try:
            while not trigger(out):
                assert proc.poll() is None, f"run {k} ended before its kill:\n{(tmp_path / f'run{k}.log').read_text()}"
                assert time.time() - start < 900, f"run {k}: no progress within 15 min"
                time.sleep(0.01)
            time.sleep(delay)
            assert proc.poll() is None, f"run {k} ended before its kill (seed {seed}, delay {delay:.2f} s)"
        finally:
            proc.kill()
            proc.wait()
        stages.append(_stage(out))
        print(f"seed {seed}: kill {k} after {delay:.2f} s, in {stages[-1]}, {len(grid_points(out))} grid points saved")
        _check_complete_files(out)
        assert not (out / "landscape.json").exists()
        now = grid_points(out)
        assert saved <= now, f"saved grid points were lost: {sorted(saved - now)}"
        saved = now
    assert {"train", "grid", "paths"} <= set(stages), stages

    log = tmp_path / "rerun.log"
    assert procs.run(argv, log, env=ENV, draw=False) == 0, log.read_text()[-3000:]
    assert_same_results(out, reference)
    meta = json.loads((out / "landscape.json").read_text())
    assert meta["grid_points_computed_this_run"] == GRID * GRID - len(saved)
    # what SIGKILL can leave behind: only temporary files of the atomic writer, which nothing reads
    for name in temp_files(out):
        assert re.fullmatch(r"\.[^/]+\.\w{8}\.tmp(\.\w+)?", Path(name).name), name


# ---------------------------------------------------------------------------------- corrupt files


def test_corrupt_training_checkpoint_starts_that_solution_over(
    reference, wordnet_root, tmp_path, monkeypatch, capsys, one_thread
):
    from adapters import train

    out = tmp_path / "run"
    real = train._save_checkpoint

    def save_then_die(path, *args, **kwargs):
        real(path, *args, **kwargs)
        if Path(path).name.startswith(".ft"):  # ft's first checkpoint (step 50) is on disk
            raise Crash

    with monkeypatch.context() as m:
        m.setattr(train, "_save_checkpoint", save_then_die)
        with pytest.raises(Crash):
            connectivity.main(_argv(wordnet_root, out))
    (ckpt,) = [p for p in (out / "solutions").glob(".ft*.ckpt") if ".tmp" not in p.name]
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # truncated
    capsys.readouterr()
    assert connectivity.main(_argv(wordnet_root, out)) == 0
    captured = capsys.readouterr()
    assert "unreadable checkpoint" in captured.out + captured.err  # said, not silent
    assert_same_results(out, reference)


def _copy(reference: Path, to: Path) -> Path:
    shutil.copytree(reference, to)
    return to


def test_corrupt_grid_file_exits_2_then_restart_recomputes(reference, wordnet_root, tmp_path, capsys, one_thread):
    out = _copy(reference, tmp_path / "run")
    rank0 = out / ".grid" / "rank0.npz"
    good = rank0.read_bytes()
    for damaged in (good[: len(good) // 2], good[:200] + b"\x00" * 64 + good[264:], b""):  # truncated, bad CRC, empty
        rank0.write_bytes(damaged)
        one_line_exit_2(_argv(wordnet_root, out), capsys, str(rank0.parent), rank0.name, "--restart")
        assert (out / "landscape.npz").read_bytes() == (reference / "landscape.npz").read_bytes()  # untouched
    assert connectivity.main(_argv(wordnet_root, out, "--restart")) == 0
    assert json.loads((out / "landscape.json").read_text())["grid_points_computed_this_run"] == GRID * GRID
    assert_same_results(out, reference)


def test_corrupt_finished_solution_exits_2_then_retraining_gives_the_same(
    reference, wordnet_root, tmp_path, capsys, one_thread
):
    out = _copy(reference, tmp_path / "run")
    lora = out / "solutions" / "lora" / "adapter_model.safetensors"
    lora.write_bytes(b"\x00" * 64 + lora.read_bytes()[64:])  # header overwritten
    one_line_exit_2(_argv(wordnet_root, out), capsys, str(lora.parent))
    shutil.copy(reference / "solutions" / "lora" / lora.name, lora)

    weights = out / "solutions" / "ft" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    one_line_exit_2(
        _argv(wordnet_root, out),
        capsys,
        str(weights.parent),
        weights.name,
        "delete it and rerun the command that trained it",
    )
    assert (out / "landscape.npz").read_bytes() == (reference / "landscape.npz").read_bytes()  # untouched
    shutil.rmtree(weights.parent)  # the fix: train it again
    assert connectivity.main(_argv(wordnet_root, out)) == 0
    assert json.loads((out / "landscape.json").read_text())["grid_points_computed_this_run"] == 0  # same ΔW
    assert_same_results(out, reference)


@pytest.mark.parametrize("method", ["ft", "lora"])
def test_nan_weight_in_a_given_solution_exits_2(reference, wordnet_root, tmp_path, capsys, method):
    folder = shutil.copytree(reference / "solutions" / method, tmp_path / method)
    (weights,) = folder.glob("*.safetensors")
    state = load_file(weights)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1 and "lora_B" not in k)
    state[name] = state[name].clone()
    state[name].view(-1)[1] = float("nan")
    save_file(state, weights)
    reseal(folder)  # a training that diverged saves its NaN, and its record matches them
    sols = [f"{m}={folder if m == method else reference / 'solutions' / m}" for m in ("ft", "lora", "randlora")]
    out = tmp_path / "out"
    one_line_exit_2(_argv(wordnet_root, out, "--solutions", *sols), capsys, str(folder), "NaN")
    assert not out.exists()


# ------------------------------------------------------------------------------------------ a full disk


def _writer_module():
    try:
        import adapters.io as module
    except ImportError:  # before the refactor the atomic writer lived in landscape.engine.store
        import landscape.engine.store as module
    return module


class _FillsUp:
    """A file on a disk that fills up: a write stores half its bytes, then fails with ENOSPC."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


class DiskFull:
    """ENOSPC at the first atomic write (``at="write"``: half the bytes reach the temporary file) or
    rename (``at="rename"``) whose destination satisfies ``when``; records that file's bytes before."""

    def __init__(self, monkeypatch):
        self.monkeypatch, self.rule, self.hit, self.before = monkeypatch, None, None, None
        module = _writer_module()
        real_write, real_replace, real_open = module.write_bytes, os.replace, open
        armed = {"open": False}

        def write_bytes(path, data):
            if self.rule and self.rule[0] == "write" and self.rule[1](Path(path)):
                self._fire(Path(path))
                armed["open"] = True
                try:
                    return real_write(path, data)
                finally:
                    armed["open"] = False
            return real_write(path, data)

        def replace(src, dst, **kwargs):
            if self.rule and self.rule[0] == "rename" and self.rule[1](Path(dst)):
                self._fire(Path(dst))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_replace(src, dst, **kwargs)

        def fills_up(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            return _FillsUp(f) if armed["open"] and "w" in mode else f

        real_stream = getattr(module, "_write_stream", None)  # the writer that streams npz / torch files

        def write_stream(path, save):
            if self.rule and self.rule[0] == "write" and self.rule[1](Path(path)):
                self._fire(Path(path))
                armed["open"] = True
                try:
                    return real_stream(path, save)
                finally:
                    armed["open"] = False
            return real_stream(path, save)

        monkeypatch.setattr(module, "write_bytes", write_bytes)
        if real_stream is not None:
            monkeypatch.setattr(module, "_write_stream", write_stream)
        monkeypatch.setattr(module, "open", fills_up, raising=False)
        monkeypatch.setattr(os, "replace", replace)

    def _fire(self, path: Path) -> None:
        self.hit, self.rule = path, None
        self.before = path.read_bytes() if path.exists() else None

    def arm(self, at: str, when) -> None:
        self.rule, self.hit, self.before = (at, when), None, None


def _fails_with_enospc(argv, capsys) -> None:
    """The run stops on the full disk with exit status 2 and one line saying so."""
    capsys.readouterr()
    code = connectivity.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line.lower() or "Traceback" in line]
    assert code == 2 and len(errors) == 1 and "no space left" in errors[0], (code, err)


def _nth(n: int, when):
    seen = {"n": 0}

    def rule(path: Path) -> bool:
        if when(path):
            seen["n"] += 1
        return seen["n"] == n

    return rule


def test_full_disk_leaves_no_half_written_file_and_a_rerun_resumes(
    reference, wordnet_root, tmp_path, monkeypatch, capsys, one_thread
):
    from adapters import solution

    out = tmp_path / "run"
    argv = _argv(wordnet_root, out)
    disk = DiskFull(monkeypatch)

    # a training checkpoint's rename (head_only's second checkpoint): the first one stays as it was
    disk.arm("rename", _nth(2, lambda p: p.name.startswith(".head_only") and p.name.endswith(".ckpt")))
    _fails_with_enospc(argv, capsys)
    assert disk.hit is not None and disk.before is not None, "the full disk was not hit"
    assert disk.hit.read_bytes() == disk.before
    assert temp_files(out) == []

    # a solution folder: none at all, and its finished training checkpoint kept
    real_save_file = solution.save_file

    def save_file_fills_up(tensors, filename, *args, **kwargs):
        if Path(filename).parent.name.startswith(".ft"):
            Path(filename).write_bytes(b"\x00" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save_file(tensors, filename, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(solution, "save_file", save_file_fills_up)
        _fails_with_enospc(argv, capsys)
    assert (out / "solutions" / "head_only").exists() and not (out / "solutions" / "ft").exists()
    assert temp_files(out) == []

    # a grid checkpoint that already holds points: the previous complete file stays
    def grid_file_with_points(path: Path) -> bool:
        return path.name == "rank0.npz" and path.exists() and len(grid_points(out)) >= 3

    disk.arm("write", grid_file_with_points)
    _fails_with_enospc(argv, capsys)
    assert disk.hit is not None and disk.before is not None, "the full disk was not hit"
    assert disk.hit.read_bytes() == disk.before
    assert temp_files(out) == []

    # the results: no file rather than half of one
    for at, name in (("write", "landscape.npz"), ("rename", "landscape.json")):
        disk.arm(at, lambda p, name=name: p.name == name)
        _fails_with_enospc(argv, capsys)
        assert disk.hit == out / name, "the full disk was not hit"
        assert not (out / name).exists() and temp_files(out) == []

    assert connectivity.main(argv) == 0  # space freed
    assert_same_results(out, reference)
    assert temp_files(out) == []


# ----------------------------------------------------------------- silent corruption


def test_bit_flip_in_a_training_checkpoint_is_not_resumed_silently(tiny_entry, tmp_path):
    import copy

    from adapters.methods import MethodSpec, attach
    from adapters.train import TrainConfig, train

    texts = [f"gloss number {i} " + "word " * (i % 6) for i in range(40)]
    data, labels = tiny_entry.encode(texts), torch.arange(40) % 4
    config, base, ckpt = TrainConfig(steps=4, batch_size=8, seed=3), tiny_entry.build(4), tmp_path / "train.ckpt"

    def run(die_at: int | None = None) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = attach(copy.deepcopy(base), MethodSpec("ft"), tiny_entry.targets)
        forward, calls = model.forward, {"n": 0}

        def dying(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == die_at:
                raise Crash
            return forward(*args, **kwargs)

        model.forward = dying
        train(model, data, labels, config, progress=False, checkpoint=ckpt, checkpoint_every=2)
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    reference = run()
    ckpt.unlink()
    with pytest.raises(Crash):
        run(die_at=3)  # the checkpoint of step 2 survives
    head = next(v for k, v in torch.load(ckpt, weights_only=True)["params"].items() if "head" in k and v.dim() == 2)
    raw = bytearray(ckpt.read_bytes())
    offset = raw.find(head.numpy().tobytes())
    assert offset > 0
    raw[offset + 2] ^= 0x40  # one byte of the head's weights, as a failing disk would flip it
    ckpt.write_bytes(bytes(raw))
    resumed = run()
    assert all(torch.equal(resumed[n], reference[n]) for n in reference), "resumed silently from a corrupt checkpoint"


def test_bit_flip_in_a_finished_solution_is_refused(reference, wordnet_root, tmp_path, capsys):
    from adapters.errors import UserError
    from adapters.solution import load_solution

    folder = shutil.copytree(reference / "solutions" / "ft", tmp_path / "ft")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    size = int.from_bytes(data[:8], "little")  # safetensors: header size, JSON header, then the tensors' bytes
    header = {k: v for k, v in json.loads(data[8 : 8 + size]).items() if k != "__metadata__"}
    start, end = max((v["data_offsets"] for v in header.values()), key=lambda o: o[1] - o[0])
    data[8 + size + (start + end) // 2 // 4 * 4] ^= 0x40  # a low mantissa bit of one float: finite, slightly off
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"model\.safetensors is not the file saved with this solution"):
        load_solution(folder, expect_method="ft")
    out = tmp_path / "out"  # given to a run: refused before any training, with nothing written
    one_line_exit_2(_argv(wordnet_root, out, "--solutions", f"ft={folder}"), capsys, str(weights), "re-copy")
    assert not out.exists()
    record = json.loads((folder / "solution.json").read_text())
    del record["sha256"]  # the message's fix for a file changed on purpose (and a solution saved before the record)
    (folder / "solution.json").write_text(json.dumps(record))
    assert load_solution(folder, expect_method="ft").info["method"] == "ft"
