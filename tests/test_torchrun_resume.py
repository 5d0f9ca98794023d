"""torchrun with 2 gloo processes, killed twice mid-grid, resumes to the single-process grid.

Nothing lost: the points saved on disk (the union over the rank files) never shrink from one kill
to the next (before every rank read every rank file, a rank's first rewrite of its own file dropped
the points it had saved in the earlier run). Nothing recomputed: the final run computes exactly the
points that were not saved yet. Nothing wrong: the grid equals a single process's bit for bit.
No assertion here reads a figure: the runs build their figures but do not draw them (tests.nodraw).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from landscape import connectivity
from tests import nodraw
from tests.conftest import free_port
from tests.procs import process_tree

GRID = 7  # 49 points, 96 evaluation samples each: long enough to kill the grid mid-way
RUN = ["--model", "tiny-bert", "--train-steps", "3", "--train-per-class", "12", "--test-per-class", "4",
       "--path-points", "0", "--no-progress"]  # fmt: skip
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def single(tmp_path_factory, wordnet_root) -> Path:
    """One process: ft / lora / randlora trained once and the grid through them. The solutions are reused by
    every torchrun run below (--solutions): those runs only do the grid, on the solutions saved here, which
    this run also evaluated (a run always evaluates its solutions as saved and loaded back)."""
    out = tmp_path_factory.mktemp("single") / "run"
    with nodraw.figures_not_drawn():
        assert connectivity.main(["--dataset", "wordnet", "--data-root", str(wordnet_root), "--out", str(out), *RUN,
                                  "--grid", str(GRID), "--eval-samples", "96"]) == 0  # fmt: skip
    return out


def _argv(wordnet_root, out, single) -> list[str]:
    solutions = [f"{name}={single / 'solutions' / name}" for name in ("ft", "lora", "randlora")]
    return ["--dataset", "wordnet", "--data-root", str(wordnet_root), "--out", str(out), *RUN, "--grid", str(GRID),
            "--eval-samples", "96", "--solutions", *solutions]  # fmt: skip


def _torchrun_cmd(argv: list[str]) -> list[str]:
    """torchrun with 2 processes, each running the main job with figures built but not drawn (tests.nodraw)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", free_port(),
            "-m", "tests.nodraw", "landscape.connectivity", *argv]  # fmt: skip


def _torchrun(argv: list[str], log: Path) -> subprocess.Popen:
    cmd = _torchrun_cmd(argv)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def _kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers. torchrun starts each worker in a session of its own, so killing
    torchrun's process group alone would leave the workers computing (and writing) on."""
    for pid in process_tree(proc.pid):
        try:
            if os.getpgid(pid) == pid:  # a group leader (torchrun, each worker): its whole group
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def _gone(pids: list[int]) -> bool:
    return not any(Path(f"/proc/{p}").exists() and "zombie" not in _state(p) for p in pids)


def _state(pid: int) -> str:
    try:
        return (Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0]).lower()
    except (OSError, IndexError):
        return "zombie"


def saved(out: Path) -> dict[str, set[tuple[int, int]]]:
    """The grid points saved in each rank file (the files are replaced atomically: always complete)."""
    found = {}
    for path in sorted((out / ".grid").glob("rank*.npz")):
        with np.load(path) as f:
            found[path.name] = set(zip(f["i"].tolist(), f["j"].tolist(), strict=True))
    return found


def _union(files: dict[str, set]) -> set:
    return set().union(*files.values())


def _interrupt(argv, out: Path, log: Path, new_points: int) -> set:
    """Start torchrun, SIGKILL it (workers included) once both ranks saved points in this run and at least
    ``new_points`` new ones are on disk; return the points saved after the kill."""
    before = _union(saved(out))
    proc = _torchrun(argv, log)
    deadline = time.time() + 900
    try:
        while True:
            assert proc.poll() is None, f"torchrun ended before it could be killed:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, "no grid progress within 15 min"
            try:
                files = saved(out)
            except (OSError, ValueError, zipfile.BadZipFile):  # a file replaced while np.load read it lazily
                continue
            fresh = {name: pts - before for name, pts in files.items()}
            if len(fresh) == 2 and all(fresh.values()) and len(_union(fresh)) >= new_points:
                break
            time.sleep(0.01)
        pids = process_tree(proc.pid)
    finally:
        _kill_all(proc)
    for _ in range(500):  # the workers are not our children: wait until they are really gone
        if _gone(pids):
            break
        time.sleep(0.01)
    assert _gone(pids), "torchrun workers survived SIGKILL"
    assert not (out / "landscape.npz").exists()
    after = _union(saved(out))
    assert before <= after, f"saved grid points were lost: {sorted(before - after)}"
    return after


def test_torchrun_killed_twice_resumes_to_the_single_process_grid(single, wordnet_root, tmp_path):
    multi = tmp_path / "multi"
    argv = _argv(wordnet_root, multi, single)
    total = GRID * GRID

    first = _interrupt(argv, multi, tmp_path / "run1.log", new_points=8)
    second = _interrupt(argv, multi, tmp_path / "run2.log", new_points=8)
    assert first < second < set(np.ndindex(GRID, GRID)), "each interrupted run saves new points, none finishes"

    proc = subprocess.run(_torchrun_cmd(argv), capture_output=True, text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    meta = json.loads((multi / "landscape.json").read_text())
    assert meta["world_size"] == 2
    # every point saved before the final run was reused, every other one computed exactly once
    assert meta["grid_points_computed_this_run"] == total - len(second)
    assert _union(saved(multi)) == set(np.ndindex(GRID, GRID))
    a, b = np.load(single / "landscape.npz"), np.load(multi / "landscape.npz")
    for key in ("x", "y", "loss", "accuracy", "loss_se"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert np.isfinite(b["loss"]).all()
