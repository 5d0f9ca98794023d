"""adapters.threads (CPU count, torch threads, OpenMP wait policy) and the contention benchmark's
bookkeeping. No timing asserts: the benchmark itself measures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapters import threads

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, env: dict | None = None) -> str:
    """Run ``code`` in a fresh interpreter (repository on the path, our thread variables removed
    unless ``env`` puts them back); returns its stdout."""
    base = {k: v for k, v in os.environ.items() if k not in threads.USER_WAIT_KEYS}
    base["PYTHONPATH"] = os.pathsep.join([str(ROOT), base.get("PYTHONPATH", "")])
    base.setdefault("HF_HUB_OFFLINE", "1")
    done = subprocess.run(
        [sys.executable, "-c", code], env=base | (env or {}), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


# --------------------------------------------------------------------------- available_cpus


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_available_cpus_respects_restricted_affinity():
    cpu = min(os.sched_getaffinity(0))
    out = run_python(
        f"import os; os.sched_setaffinity(0, {{{cpu}}}); from adapters.threads import available_cpus; "
        "print(available_cpus())"
    )
    assert out == "1"


def test_available_cpus_is_affinity_capped_by_quota(monkeypatch):
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 8)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.available_cpus() == 8
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 1.5)
    assert threads.available_cpus() == 2  # a fractional quota rounds up
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 0.2)
    assert threads.available_cpus() == 1
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 32.0)
    assert threads.available_cpus() == 8  # the affinity wins when it is smaller
    monkeypatch.setattr(threads, "affinity_cpus", lambda: 0)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.available_cpus() == 1  # never below 1


def test_available_cpus_on_this_machine():
    n = threads.available_cpus()
    assert 1 <= n <= (os.cpu_count() or n)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_cpu_max(tmp_path):
    proc = tmp_path / "cgroup"
    root = tmp_path / "fs"
    write(proc, "0::/user.slice/job\n")
    write(root / "user.slice" / "job" / "cpu.max", "max 100000\n")
    assert threads.cgroup_cpu_limit(proc, root) is None
    write(root / "user.slice" / "cpu.max", "150000 100000\n")  # an ancestor's limit applies too
    assert threads.cgroup_cpu_limit(proc, root) == pytest.approx(1.5)
    write(root / "user.slice" / "job" / "cpu.max", "50000 100000\n")
    assert threads.cgroup_cpu_limit(proc, root) == pytest.approx(0.5)  # the smallest wins


def test_cgroup_v2_namespaced_mount(tmp_path):
    """In a container the listed path is "/" and the mount itself is the container's cgroup."""
    proc, root = tmp_path / "cgroup", tmp_path / "fs"
    write(proc, "0::/\n")
    write(root / "cpu.max", "300000 100000\n")
    assert threads.cgroup_cpu_limit(proc, root) == pytest.approx(3.0)


def test_cgroup_v1_cfs_quota(tmp_path):
    proc, root = tmp_path / "cgroup", tmp_path / "fs"
    write(proc, "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    folder = root / "cpu,cpuacct" / "docker" / "abc"
    write(folder / "cpu.cfs_quota_us", "-1\n")
    write(folder / "cpu.cfs_period_us", "100000\n")
    assert threads.cgroup_cpu_limit(proc, root) is None
    write(folder / "cpu.cfs_quota_us", "200000\n")
    assert threads.cgroup_cpu_limit(proc, root) == pytest.approx(2.0)


def test_cgroup_missing_or_garbage(tmp_path):
    assert threads.cgroup_cpu_limit(tmp_path / "none", tmp_path / "fs") is None
    proc, root = tmp_path / "cgroup", tmp_path / "fs"
    write(proc, "garbage\n0::/a\n")
    write(root / "a" / "cpu.max", "lots 100000\n")
    assert threads.cgroup_cpu_limit(proc, root) is None


# --------------------------------------------------------------------------- configure


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_configure_sets_intra_op_threads(restore_threads, n):
    assert threads.configure(n) == n
    assert torch.get_num_threads() == n


def test_configure_default_is_available_cpus(restore_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert threads.configure() == threads.available_cpus() == torch.get_num_threads()
    assert threads.configure(None) == threads.available_cpus()


def test_default_threads_honours_omp_num_threads_and_torchrun(monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert threads.default_threads() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # torchrun: 3 processes on this machine share the CPUs
    assert threads.default_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert threads.default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "5,2")  # the user's (or torchrun's) explicit choice wins
    assert threads.default_threads() == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert threads.default_threads() == 1


@pytest.mark.parametrize("bad", [0, -1])
def test_configure_rejects_non_positive(bad):
    with pytest.raises(ValueError):
        threads.configure(bad)


# Two fresh interpreters, each shared by the tests of what it shows (a fresh one costs seconds of imports).


@pytest.fixture(scope="module")
def adapters_first() -> dict:
    """``import adapters`` before torch: the policy in the environment and in effect; then configure(1)."""
    return json.loads(
        run_python(
            "import os, json; import adapters; import torch; from adapters import threads; "
            "policy = [os.environ.get('OMP_WAIT_POLICY'), threads.wait_policy_in_effect()]; n = threads.configure(1); "
            "print(json.dumps({'policy': policy, 'threads': [n, torch.get_num_threads(), "
            "torch.get_num_interop_threads()]}))"
        )
    )


@pytest.fixture(scope="module")
def torch_first() -> dict:
    """torch imported, and its inter-op threads set, before ``import adapters``; then configure(2)."""
    return json.loads(
        run_python(
            "import json, torch; torch.set_num_interop_threads(1); import adapters; from adapters import threads; "
            "in_effect = threads.wait_policy_in_effect(); n = threads.configure(2); "
            "print(json.dumps({'in_effect': in_effect, 'threads': [n, torch.get_num_threads(), "
            "torch.get_num_interop_threads()]}))"
        )
    )


def test_configure_sets_interop_threads_in_a_fresh_process(adapters_first):
    assert adapters_first["threads"] == [1, 1, 1]


def test_configure_after_interop_work_keeps_going(torch_first):
    """torch refuses to change inter-op threads once set: configure must still set the intra-op ones."""
    assert torch_first["threads"] == [2, 2, 1]


# --------------------------------------------------------------------------- wait policy


def test_set_wait_policy_sets_passive_when_unset():
    env: dict[str, str] = {}
    assert threads.set_wait_policy(env) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.parametrize("user", [{"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "1000"}, {"KMP_BLOCKTIME": "200"}])
def test_set_wait_policy_leaves_the_users_choice(user):
    env = dict(user)
    assert threads.set_wait_policy(env) == {}
    assert env == user


def test_import_adapters_sets_policy_before_torch(adapters_first):
    assert adapters_first["policy"] == ["PASSIVE", True]


def test_policy_set_after_torch_is_reported_not_in_effect(torch_first):
    assert torch_first["in_effect"] is False


def test_users_policy_is_kept():
    out = run_python(
        "import os, json; import adapters; from adapters import threads; "
        "print(json.dumps([os.environ['OMP_WAIT_POLICY'], threads.info()['wait_env_set_by_us']]))",
        env={"OMP_WAIT_POLICY": "ACTIVE"},
    )
    assert json.loads(out) == ["ACTIVE", {}]


def test_info_is_json():
    info = threads.info()
    json.dumps(info)
    assert info["available_cpus"] >= 1 and info["intra_op_threads"] >= 1
    if sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info():
        assert info["openmp_runtime"] is not None  # torch's pip wheels load libgomp


# --------------------------------------------------------------------------- the benchmark's bookkeeping


def test_contention_summary_and_table():
    from experiments.benchmarks import contention

    ms = []
    for settings, alone, beside in (("ours", 1.0, 2.2), ("defaults", 0.9, 9.0)):
        for cond, s in (("alone", alone), ("torch", beside)):
            for rep in range(2):
                ms.append({"stage": "train-effnet", "settings": settings, "condition": cond, "rep": rep,
                           "steps": 2, "wall_s": 2 * s, "cpu_s": s})  # fmt: skip
    cases = {c["settings"]: c for c in contention.summarize(ms)}
    assert cases["ours"]["alone"]["s_per_step"] == pytest.approx(1.0)
    assert cases["ours"]["slowdown"]["torch"] == pytest.approx(2.2)
    assert cases["ours"]["target_met"] is True
    assert cases["defaults"]["slowdown"]["torch"] == pytest.approx(10.0)
    assert cases["defaults"]["slowdown_vs_best_alone"]["torch"] == pytest.approx(10.0)
    assert "target_met" not in cases["defaults"]
    text = contention.table({"competitors": ["torch"], "cases": list(cases.values()), "worker_threads": {}})
    assert "2.20x" in text and "10.00x" in text


def test_contention_machine_info_and_env():
    from experiments.benchmarks import contention

    info = contention.cpu_model()
    assert set(info) >= {"cpu_model", "avx512"} and isinstance(info["avx512"], bool)
    env = contention.child_env()
    assert not set(env) & set(contention.THREAD_ENV)
    # "defaults" workers import torch before anything of ours; "ours" workers do not
    assert "import torch" in " ".join(contention.worker_cmd("defaults", ["train-effnet"], None))
    assert "import torch" not in " ".join(contention.worker_cmd("ours", ["train-effnet"], 2))


def test_contention_kill_ends_a_stopped_competitor(tmp_path):
    from experiments.benchmarks import contention

    proc = contention.Proc("competitor-busy", contention.competitor_cmd("busy"), tmp_path)
    try:
        assert proc.read() == {"ready": True}
        proc.signal(signal.SIGSTOP)
    finally:
        proc.kill()
    assert proc.popen.poll() is not None
