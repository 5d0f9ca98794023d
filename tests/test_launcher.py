"""``--launcher local``: the run's work as submitit jobs (landscape.launch), one grid shard killed, the command rerun.

The jobs are real processes started by submitit's LocalExecutor, through the code path Slurm jobs take
(pickled Checkpointable calls run by ``submitit.core._submit``). The reference is the same command run in one
process; the gathered run must write the same numbers (atol 1e-6) and record the launcher and its shards.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from landscape import connectivity
from landscape.launch import plan
from tests import nodraw
from tests.procs import process_tree

pytest.importorskip("submitit")

RUN = ["--model", "tiny-bert", "--methods", "lora", "randlora", "--train-steps", "3", "--train-per-class", "12",
       "--test-per-class", "4", "--grid", "4", "--eval-samples", "16", "--path-points", "3", "--no-progress",
       "--threads", "1"]  # fmt: skip
SHARDS = 2


def _argv(wordnet_root: Path, out: Path) -> list[str]:
    return ["--dataset", "wordnet", "--data-root", str(wordnet_root), "--out", str(out), *RUN]


def _state(out: Path) -> dict:
    try:
        return json.loads((out / plan.FOLDER / "state.json").read_text())["jobs"]
    except (OSError, ValueError, KeyError):
        return {}


def test_killed_shard_is_resubmitted_and_the_gathered_run_equals_one_process(tmp_path, wordnet_root):
    single, launched = tmp_path / "single", tmp_path / "launched"
    with nodraw.figures_not_drawn():
        assert connectivity.main(_argv(wordnet_root, single)) == 0
    argv = [*_argv(wordnet_root, launched), "--launcher", "local", "--shards", str(SHARDS)]

    assert connectivity.main(argv) == 0  # submits the training jobs and returns
    jobs = _state(launched)
    assert sorted(jobs) == ["train-head_only-seed0", "train-lora-seed0", "train-randlora-seed0"]
    deadline = time.monotonic() + 300
    while not any(name.startswith("grid-") for name in _state(launched)):  # rerun until the grid is submitted
        assert time.monotonic() < deadline, "the training jobs did not finish"
        time.sleep(0.5)
        assert connectivity.main(argv) == 0
    grid = {k: v for k, v in _state(launched).items() if k.startswith("grid-")}
    assert len(grid) == SHARDS
    victim = sorted(grid)[-1]
    for pid in process_tree(int(grid[victim]["job_id"])):  # the shard's shell, submitit's controller and the task
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    assert connectivity.main([*argv, "--wait"]) == 0  # gathers, resubmits the killed shard, finishes
    jobs = _state(launched)
    assert jobs[victim]["attempts"] == 2 and jobs["finish"]["attempts"] == 1
    assert all(v["attempts"] == 1 for k, v in jobs.items() if k != victim)

    with np.load(single / "landscape.npz") as a, np.load(launched / "landscape.npz") as b:
        for key in ("x", "y", "loss", "accuracy", "loss_se", "points"):
            np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6, err_msg=key)
    assert (launched / ".paths" / "rank0.npz").exists()  # the paths' inner points: the array's path task
    with np.load(single / "paths.npz") as a, np.load(launched / "paths.npz") as b:
        for key in ("t", "loss", "accuracy", "loss_se"):
            np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6, err_msg=key)
    pairs_a = json.loads((single / "paths.json").read_text())["pairs"]
    pairs_b = json.loads((launched / "paths.json").read_text())["pairs"]
    for pair, info in pairs_a.items():  # the paired errors need the per-sample losses the path task stored
        for key in ("barrier", "barrier_se", "peak_above_endpoint_mean_se"):
            assert pairs_b[pair][key] == pytest.approx(info[key], abs=1e-6), (pair, key)
    meta_a = json.loads((single / "landscape.json").read_text())
    meta_b = json.loads((launched / "landscape.json").read_text())
    launcher = meta_b["launcher"]
    assert (launcher["name"], launcher["shards"]) == ("local", SHARDS) and "launcher" not in meta_a
    assert sorted(launcher["job_seconds"]) == sorted(set(jobs) - {"finish"})  # every job before the finish
    for name, s in meta_a["solutions"].items():
        for key in ("vertex_loss", "test_accuracy"):
            assert meta_b["solutions"][name][key] == pytest.approx(s[key], abs=1e-6), (name, key)


CLUSTER_TOML = """
[cluster]
launcher = "slurm"
partition = "gpu"
gpus_per_task = 2
time_limit = 90
array_parallelism = 8
slurm = { account = "proj", qos = "high", mem = "64G" }
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """Stand-ins for Slurm's sbatch (it keeps the script it is given and answers job 4242) and srun (which
    submitit looks for), first on PATH; returns the folder the scripts are kept in."""
    bin_dir, scripts = tmp_path / "bin", tmp_path / "scripts"
    bin_dir.mkdir()
    scripts.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {scripts}/job.sh\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for name in ("sbatch", "srun"):
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return scripts


def test_cluster_settings_reach_the_sbatch_script(tmp_path, fake_slurm):
    """The [cluster] table of a run's TOML becomes the #SBATCH lines submitit writes (partition, GPUs per task,
    time, array parallelism, the passthrough), read from submitit's own script builder."""
    from landscape import config as run_config
    from landscape.launch import submit

    toml = tmp_path / "run.toml"
    toml.write_text(CLUSTER_TOML)
    config = run_config.from_argv(["--config", str(toml), "--out", str(tmp_path / "out")])
    assert (config.launcher, config.partition, config.gpus_per_task, config.time_limit) == ("slurm", "gpu", 2, 90)
    text = submit.sbatch_text(config, tmp_path / "logs", "grid", tasks=12)
    lines = {line for line in text.splitlines() if line.startswith("#SBATCH")}
    for expected in ("--partition=gpu", "--gpus-per-task=2", "--time=90", "--account=proj", "--qos=high",
                     "--mem=64G", "--array=0-11%8", "--job-name=landscape-grid", "--ntasks-per-node=1"):  # fmt: skip
        assert f"#SBATCH {expected}" in lines, (expected, sorted(lines))
    assert f"export PYTHONPATH={submit.project_root()}" in text  # the jobs import this checkout
    assert config.to_dict()["launcher"] == "slurm"


def test_slurm_driver_submits_the_training_as_one_array_and_returns(tmp_path, wordnet_root, fake_slurm, capsys):
    """--launcher slurm with a stand-in sbatch: the driver submits one job per (method, seed) as one array, prints
    the ids, records them, and returns without waiting."""
    out = tmp_path / "run"
    argv = [*_argv(wordnet_root, out), "--launcher", "slurm", "--partition", "gpu", "--time-limit", "30"]
    assert connectivity.main(argv) == 0
    jobs = _state(out)
    assert {k: v["job_id"] for k, v in jobs.items()} == {
        "train-head_only-seed0": "4242_0", "train-lora-seed0": "4242_1", "train-randlora-seed0": "4242_2"}  # fmt: skip
    printed = capsys.readouterr().out
    assert "submitted train-lora-seed0: job 4242_1" in printed
    script = (fake_slurm / "job.sh").read_text()
    assert "#SBATCH --array=0-2%3" in script and "#SBATCH --partition=gpu" in script and "#SBATCH --time=30" in script
    assert not (out / "landscape.json").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--launcher", "local", "--shards", "0"], "--shards 0: must be an integer >= 1"),
        (["--partition", "gpu"], "--partition gpu: cluster settings apply with --launcher local or slurm only"),
    ],
)
def test_bad_cluster_settings_are_one_line_before_any_work(tmp_path, argv, message, capsys):
    assert connectivity.main(["--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_slurm_without_slurm_is_one_line(tmp_path, wordnet_root, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch, no srun
    assert connectivity.main([*_argv(wordnet_root, tmp_path / "run"), "--launcher", "slurm"]) == 2
    assert "sbatch and srun not found on PATH" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('launcher = "slurm"\nslurm = { time = "1:00:00" }', "'time' cannot be passed through: set time_limit instead"),
        ('launcher = "pbs"', "run.toml [cluster] launcher = 'pbs': not a valid choice: use one of local, slurm"),
        ('launcher = "local"\ntime_limit = 0', "time_limit = 0: must be an integer >= 1"),
    ],
)
def test_bad_cluster_table_is_one_line(tmp_path, table, message, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(f"[cluster]\n{table}\n")
    assert connectivity.main(["--config", str(toml), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_draws_and_curvature_run_as_array_tasks_and_equal_one_process(tmp_path, wordnet_root):
    """A random line's other draws are grid tasks of the array too (.grid/draw-k, the draw's own directions), and
    --curvature's (solution, coordinates) entries are tasks: one for the top eigenvalues, and the trace and density
    probes in ranges, several tasks per entry, which the finish job joins into the entry and reuses by key: with
    --wait the command runs every phase, and the draws' losses and curvature.json equal a one-process run's."""
    from landscape.curvature import CurvatureSettings

    line = ["--model", "tiny-bert", "--train-steps", "2", "--grid", "3", "--eval-samples", "16", "--path-points", "0",
            "--train-per-class", "12", "--test-per-class", "4", "--no-progress", "--threads", "1", "--chart",
            "random-line", "--center", "lora", "--draws", "2", "--methods", "lora", "--curvature"]  # fmt: skip
    single, launched = tmp_path / "single", tmp_path / "launched"
    base = ["--dataset", "wordnet", "--data-root", str(wordnet_root), *line]
    with nodraw.figures_not_drawn():
        assert connectivity.main([*base, "--out", str(single)]) == 0
    assert connectivity.main([*base, "--out", str(launched), "--launcher", "local", "--shards", "1", "--wait"]) == 0
    parts = plan.probe_parts(CurvatureSettings())  # per probe task of an entry: its (kind, start, stop)
    ranges = {kind: r for kind, r in plan.probe_kinds(CurvatureSettings())}
    assert len(parts) >= 2 and all(len(r) >= 2 for r in ranges.values()), parts  # each kind over two tasks or more
    probe_tasks = [f"curvature-lora-{c}-probes-{k}-of-{len(parts)}" for c in ("adapter", "weights")
                   for k in range(len(parts))]  # fmt: skip
    assert sorted(_state(launched)) == sorted(["curvature-lora-adapter-eigen", "curvature-lora-weights-eigen",
                                               *probe_tasks, "draw1-grid-0-of-1", "finish", "grid-0-of-1",
                                               "train-head_only-seed0", "train-lora-seed0"])  # fmt: skip
    assert (launched / ".grid" / "draw-1" / "rank0.npz").exists()  # draw 1 was evaluated by its array task
    meta = json.loads((launched / "landscape.json").read_text())
    assert meta["chart_geometry"]["draws"]["points_computed_this_run"] == 0  # the finish job found every point
    with np.load(single / "landscape.npz") as a, np.load(launched / "landscape.npz") as b:
        for key in ("loss", "draw_loss", "draw_accuracy", "draw_loss_se", "x"):
            np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6, err_msg=key)
        assert np.array_equal(a["draw_seeds"], b["draw_seeds"])
    a = json.loads((single / "curvature.json").read_text())["solutions"]["lora"]
    b = json.loads((launched / "curvature.json").read_text())["solutions"]["lora"]
    assert sorted(a) == sorted(b) == ["adapter", "weights"]
    for coordinates, entry in a.items():
        got = b[coordinates]
        assert got.get("reused") is True and got["key"] == entry["key"], coordinates  # computed by its tasks
        # the trace and density were joined from the probe tasks' parts, one file per range under the entry's key
        assert got["probe_tasks"] == {kind: [list(x) for x in r] for kind, r in ranges.items()}, coordinates
        folder = launched / ".curvature" / f"lora-{coordinates}"
        assert sorted(p.name for p in folder.glob("*-*-*.json")) == sorted(
            f"{kind}-{a}-{b}.json" for kind, r in ranges.items() for a, b in r)  # fmt: skip
        assert "probes_apart" not in got and got["hvps"] == entry["hvps"], coordinates
        for key in ("eigenvalues", "trace", "trace_se"):
            np.testing.assert_allclose(got[key], entry[key], rtol=1e-9, atol=1e-6, err_msg=f"{coordinates} {key}")
        np.testing.assert_allclose(got["hutchinson"]["samples"], entry["hutchinson"]["samples"], rtol=0, atol=1e-6)
        for key in ("values", "grid", "nodes", "weights"):
            np.testing.assert_allclose(got["density"][key], entry["density"][key], rtol=1e-9, atol=1e-6, err_msg=key)


def bad_input_job(config, *args) -> None:
    """A job body that meets a bad input (as a data folder missing on the compute nodes would be)."""
    from adapters.errors import UserError

    raise UserError(f"the data folder {config.out_dir / 'nowhere'} does not exist: pass --data-root")


def test_a_job_stopped_by_a_bad_input_is_its_one_line_error_then_forgotten(tmp_path, wordnet_root):
    """A job's UserError comes back from the driver as that one line (not resubmitted: a second attempt would meet
    it again); the task's record goes with it, so the command rerun after the fix submits it again."""
    from adapters.errors import UserError
    from landscape import config as run_config
    from landscape import launch

    out = tmp_path / "run"
    config = run_config.from_argv([*_argv(wordnet_root, out), "--launcher", "local", "--wait"])
    jobs = {kind: bad_input_job for kind in ("train", "grid", "finish")}
    with pytest.raises(UserError, match=r"train-\S+-seed0 job stopped: the data folder .*nowhere does not exist"):
        launch.drive(config, [], jobs, poll_s=0.5)
    state = _state(out)
    stopped = [name for name in ("train-head_only-seed0", "train-lora-seed0", "train-randlora-seed0")
               if name not in state]  # fmt: skip
    assert len(stopped) == 1 and not (out / plan.FOLDER / "failed" / f"{stopped[0]}.json").exists()
    assert not (out / "landscape.json").exists()


def test_probe_parts_join_into_the_entry_or_leave_it_to_the_finish_job(tmp_path):
    """The join of an eigenvalue task's entry with its probe parts: the trace is the mean of every range's samples
    (numpy on the samples, in probe order) with their standard error, the HVPs summed; a part missing, or stored
    under another entry's key (other settings), leaves the entry to the finish job (None)."""
    from landscape.curvature import CurvatureSettings
    from landscape.launch import probes

    settings = CurvatureSettings(trace_probes=7, slq_probes=3, slq_steps=4)
    rng = np.random.default_rng(0)
    entry = {"key": "k1", "eigenvalues": [3.0], "trace": None, "trace_se": None, "hvps": 11, "seconds": 1.0,
             "cpu_seconds": 2.0, "probes_apart": True}  # fmt: skip
    samples = []
    for kind, ranges in plan.probe_kinds(settings):
        for a, b in ranges:
            if kind == "trace":
                part = {"samples": rng.normal(size=b - a).tolist()}
                samples += part["samples"]
            else:
                nodes = rng.normal(size=(b - a, 4))
                part = {"steps": 4, "dim": 50, "nodes": nodes.tolist(), "weights": np.full((b - a, 4), 0.25).tolist()}
            part |= {"kind": kind, "seed": 0, "start": a, "stop": b, "hvps": b - a, "seconds": 0.5, "cpu_seconds": 1}
            probes.write_part(probes.part_path(tmp_path, kind, a, b), "k1", part)
    joined = probes.join(entry, tmp_path, settings)
    x = np.asarray(samples)
    assert joined["trace"] == pytest.approx(x.mean(), abs=1e-12)
    assert joined["trace_se"] == pytest.approx(x.std(ddof=1) / np.sqrt(len(x)), abs=1e-12)
    assert joined["hvps"] == 11 + 7 + 3 and joined["density"]["probes"] == 3 and "probes_apart" not in joined
    assert joined["probe_tasks"] == {k: [list(r) for r in ranges] for k, ranges in plan.probe_kinds(settings)}
    last = plan.probe_kinds(settings)[1][1][-1]
    path = probes.part_path(tmp_path, "density", *last)
    path.write_text(path.read_text().replace('"k1"', '"k2"'))  # a part of other settings
    assert probes.join(entry, tmp_path, settings) is None
    path.unlink()
    assert probes.join(entry, tmp_path, settings) is None


def test_curve_runs_as_a_training_job_then_point_tasks_and_equals_one_process(tmp_path, tiny_wordnet_run):
    """``landscape.curves --launcher local``: the curve's training is one job, its (row, t) points two array tasks
    whose per-sample losses are stored (``curves/.A-B-points``), one of them killed and resubmitted, and the finish
    job writes the files: equal to a run of the command in one process (atol 1e-6), the paired errors of the
    barriers included."""
    from landscape import curves

    single, launched = tmp_path / "single", tmp_path / "launched"
    argv = ["--run", str(tiny_wordnet_run), "--pair", "ft,lora", "--bends", "1", "--steps", "4", "--points", "3",
            "--no-progress", "--threads", "1", "--one-seed"]  # fmt: skip
    with nodraw.figures_not_drawn():
        assert curves.main([*argv, "--out", str(single)]) == 0
    cluster = ["--launcher", "local", "--shards", "2", "--gpus-per-task", "0"]
    assert curves.main([*argv, "--out", str(launched), *cluster]) == 0  # submits the training job and returns
    state = launched / "curves" / ".ft-lora-launch"
    assert sorted(_state(state)) == ["curve-train-run-seed"]
    deadline = time.monotonic() + 300
    while not any(name.startswith("curve-points-") for name in _state(state)):  # rerun until the points are
        assert time.monotonic() < deadline, "the training job did not finish"
        time.sleep(0.5)
        assert curves.main([*argv, "--out", str(launched), *cluster]) == 0
    victim = "curve-points-run-seed-1-of-2"
    for pid in process_tree(int(_state(state)[victim]["job_id"])):  # killed: the driver's to resubmit
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert curves.main([*argv, "--out", str(launched), *cluster, "--wait"]) == 0
    jobs = _state(state)
    assert sorted(jobs) == ["curve-points-run-seed-0-of-2", victim, "curve-train-run-seed", "finish"]
    assert jobs[victim]["attempts"] == 2 and all(v["attempts"] == 1 for k, v in jobs.items() if k != victim)
    stored = sorted(p.name for p in (launched / "curves" / ".ft-lora-points").glob("rank*.npz"))
    assert stored == ["rank0.npz", "rank1.npz"]  # each task's points, with their per-sample losses
    points = {}
    for name in stored:
        with np.load(launched / "curves" / ".ft-lora-points" / name) as f:
            rows = zip(f["i"], f["j"], f["loss"], f["samples"], strict=True)
            points |= {(int(i), int(j)): (loss, len(s)) for i, j, loss, s in rows}
    assert sorted(points) == [(k, j) for k in range(2) for j in range(3)]  # every point was a task's
    with np.load(single / "curves" / "ft-lora.npz") as a, np.load(launched / "curves" / "ft-lora.npz") as b:
        for key in ("t", "loss", "accuracy", "loss_se", "train_loss"):
            np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6, err_msg=key)
        for (k, j), (loss, samples) in points.items():
            assert loss == b["loss"][k, j] and samples == 16, (k, j)  # the finish job read them back
    meta_a = json.loads((single / "curves" / "ft-lora.json").read_text())
    meta_b = json.loads((launched / "curves" / "ft-lora.json").read_text())
    for row in curves.ROWS:
        for key in ("barrier", "barrier_se", "peak_above_endpoint_mean", "peak_above_endpoint_mean_se"):
            assert meta_b[row][key] == pytest.approx(meta_a[row][key], abs=1e-6), (row, key)
    assert not list((launched / "curves").glob(".ft-lora-*.ckpt")), "the checkpoint goes once the curve is written"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--launcher", "local", "--shards", "0"], "--shards 0: must be an integer >= 1"),
        (["--partition", "gpu"], "--partition gpu: cluster settings apply with --launcher local or slurm only"),
    ],
)
def test_bad_curve_cluster_settings_are_one_line_before_any_work(tmp_path, tiny_wordnet_run, argv, message, capsys):
    """The curve command's cluster options are checked by the run's own validation, before the run is opened."""
    from landscape import curves

    out = tmp_path / "out"
    assert curves.main(["--run", str(tiny_wordnet_run), "--pair", "ft,lora", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()
