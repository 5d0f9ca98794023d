"""CPU threads: how many torch uses, and how its idle threads wait.

Why this exists. torch's CPU kernels run on a GNU OpenMP (libgomp) thread pool (pip wheels;
MKL and oneDNN inside torch use the same pool). With ``OMP_WAIT_POLICY`` unset, a libgomp thread
that runs out of work busy-waits for ``GOMP_SPINCOUNT`` = 300,000 ``pause`` iterations before it
sleeps; libgomp assumes ~10 ns per pause (3 ms), but a pause takes ~47 ns on the project's Xeon
(Sapphire Rapids class), so each wait can burn ~14 ms of a CPU. A training step enters ~1000
parallel regions (EfficientNet-Lite0 FT; ~600 for MiniLM, ~440 per grid point). Alone, the spin
is harmless. With as many threads as CPUs and another CPU-bound process beside it, the spinning
thread takes the CPU from the thread (or process) that holds the remaining work, and the step
collapses (the issue: 0.17 s -> 13 s per step). With ``OMP_WAIT_POLICY=PASSIVE`` idle threads
sleep at once and the step costs about what a fair share of the CPUs gives (numbers:
``python -m experiments.benchmarks.contention``).

Two parts, because libgomp reads its environment once, when it is loaded, i.e. at ``import torch``:

- :func:`set_wait_policy` puts the wait policy in ``os.environ`` (only what the user has not set
  themselves). ``import adapters`` calls it first thing, so any entry point that imports
  ``adapters`` (or a package that imports it) before ``torch`` gets it. Afterwards it has no
  effect on the running process (only on child processes); :func:`info` says which case holds.
- :func:`configure` sets torch's thread counts at the start of a run: intra-op threads (default:
  :func:`available_cpus`, the CPUs this process may really use: affinity and cgroup quota; torch's own
  default ignores a cgroup quota) and inter-op threads when torch still allows it.

This module does not import torch at import time.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

# What goes into the environment before the OpenMP runtime starts (only keys the user left unset).
# OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep at once instead of spinning. Measured on the 2-core
# machine (shared with other work: load average ~10 throughout, so "alone" means beside that load):
# - EfficientNet-Lite0 FT step, torch defaults: 15.2 s alone, 30.6 s beside one copy of the same job
#   with torch defaults; PASSIVE: 2.26 s alone, 2.53 s beside it, 3.24 s beside a PASSIVE copy.
#   MiniLM grid point: defaults 10.5 / 22.8 s, PASSIVE 5.05 / 6.91 s (contention benchmark, --quick).
# - GOMP_SPINCOUNT=1000 / 10000 (spin less, then sleep): slower than PASSIVE on small ops (best of 3000
#   256k-element adds: 46 / 69-130 us vs 30 us) and 30000 already collapses beside a competitor (15 s
#   per FT step); 1 thread: ~2x slower than PASSIVE beside a 2-thread competitor.
# - Cost alone: waking a sleeping thread adds ~15 us per parallel region (adds: 30 us PASSIVE vs 16.5 us
#   spinning), i.e. by the region counts above an estimated ~10 % per EfficientNet FT step, ~5 % per
#   MiniLM step, ~2 % per grid point on an idle machine; the benchmark's "/defaults" column measures it.
# It is the standard OpenMP variable: libgomp sets its spin count to 0 from it, and Intel's / LLVM's
# runtime (conda builds of torch) take it as KMP_BLOCKTIME=0 unless that is set.
WAIT_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
# Variables that, set by the user, already decide how the OpenMP threads wait: we then leave the policy alone.
USER_WAIT_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "KMP_LIBRARY")

_state: dict = {"env_set": {}, "torch_loaded_first": None}


def set_wait_policy(environ: dict | None = None) -> dict[str, str]:
    """Put :data:`WAIT_ENV` into ``environ`` (default ``os.environ``) unless the user decided the
    waiting already (any of :data:`USER_WAIT_KEYS` set). Returns what it set. Call before ``import torch``."""
    env = os.environ if environ is None else environ
    done: dict[str, str] = {}
    if not any(k in env for k in USER_WAIT_KEYS):
        for key, value in WAIT_ENV.items():
            env[key] = value
            done[key] = value
    if environ is None:
        _state["env_set"] = done
        _state["torch_loaded_first"] = "torch" in sys.modules
    return done


# --------------------------------------------------------------------------- how many CPUs


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_lines(proc_cgroup: Path) -> list[tuple[str, list[str], str]]:
    """(hierarchy id, controllers, path) per line of /proc/self/cgroup."""
    out = []
    for line in (_read(proc_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out.append((parts[0], [c for c in parts[1].split(",") if c], parts[2]))
    return out


def _ancestors(root: Path, path: str) -> list[Path]:
    """``root/path`` and every folder above it up to ``root`` (deepest first)."""
    parts = [p for p in path.split("/") if p and p != ".."]
    return [root.joinpath(*parts[:k]) for k in range(len(parts), -1, -1)]


def cgroup_cpu_limit(proc_cgroup: str | os.PathLike = "/proc/self/cgroup", root: str | os.PathLike = "/sys/fs/cgroup"):
    """The CPU bandwidth limit of this process's cgroups, in CPUs (e.g. 1.5), or None when unlimited.

    cgroup v2: ``cpu.max`` (``"max 100000"`` or ``"150000 100000"``) of the process's cgroup and
    every ancestor. cgroup v1: ``cpu.cfs_quota_us / cpu.cfs_period_us`` (quota -1: none) of the cpu
    controller's cgroup and its ancestors, under ``root/cpu``, ``root/cpu,cpuacct`` or
    ``root/cpuacct,cpu``. Inside a container the listed path may not exist under the mount (the
    mount is the container's own cgroup): the mount's own files count too. The smallest limit wins.
    """
    proc_cgroup, root = Path(proc_cgroup), Path(root)
    limits: list[float] = []
    for hierarchy, controllers, path in _cgroup_lines(proc_cgroup):
        if hierarchy == "0" and not controllers:  # v2 unified hierarchy
            for folder in _ancestors(root, path) + [root]:
                text = _read(folder / "cpu.max")
                if not text:
                    continue
                fields = text.split()
                if len(fields) == 2 and fields[0] != "max":
                    try:
                        quota, period = int(fields[0]), int(fields[1])
                    except ValueError:
                        continue
                    if quota > 0 and period > 0:
                        limits.append(quota / period)
        elif "cpu" in controllers:  # v1 cpu controller
            for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
                base = root / mount
                for folder in _ancestors(base, path) + [base]:
                    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
                    try:
                        q, p = int(quota or ""), int(period or "")
                    except ValueError:
                        continue
                    if q > 0 and p > 0:
                        limits.append(q / p)
    return min(limits) if limits else None


def affinity_cpus() -> int:
    """CPUs this process may run on (``os.sched_getaffinity``; ``os.cpu_count()`` where that is missing)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def available_cpus() -> int:
    """CPUs this process can really use: the smaller of its CPU affinity and its cgroup CPU quota
    (rounded up: 1.5 CPUs of quota -> 2), at least 1."""
    n = affinity_cpus()
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, math.ceil(limit))
    return max(1, n)


def default_threads() -> int:
    """Intra-op threads when none are asked for: ``OMP_NUM_THREADS`` when set (the user's choice, or
    torchrun's 1 per process), else :func:`available_cpus` shared among the processes torchrun started
    on this machine (``LOCAL_WORLD_SIZE``), at least 1."""
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if first.isdigit() and int(first) > 0:
        return int(first)
    local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    share = int(local) if local.isdigit() and int(local) > 0 else 1
    return max(1, available_cpus() // share)


# --------------------------------------------------------------------------- torch


def configure(threads: int | None = None) -> int:
    """Set torch's CPU threads for this run; returns the intra-op thread count used.

    ``threads``: intra-op threads (``torch.set_num_threads``); None: :func:`default_threads` (the
    available CPUs, or ``OMP_NUM_THREADS`` when set, shared among torchrun's local processes).
    Inter-op threads are set to the same number when torch still allows it (only before any
    inter-op work has started; otherwise left as they are). The OpenMP wait policy cannot be
    changed here (see :func:`set_wait_policy`); :func:`info` records whether it is in effect.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or None (auto), not {threads}")
    import torch

    n = default_threads() if threads is None else int(threads)
    torch.set_num_threads(n)
    if torch.get_num_interop_threads() != n:
        try:
            torch.set_num_interop_threads(n)
        except RuntimeError:  # "cannot set number of interop threads after parallel work has started"
            pass
    _state["configured"] = n
    return n


def wait_policy_in_effect() -> bool:
    """Whether this process's OpenMP threads sleep when idle: a passive policy (``OMP_WAIT_POLICY=PASSIVE``
    or ``GOMP_SPINCOUNT=0``) was in the environment when the OpenMP runtime started. When we set the
    policy ourselves, that is whether torch was not imported yet; a policy the user set counts as in effect."""
    if _state["env_set"]:
        return not _state["torch_loaded_first"]
    policy = os.environ.get("OMP_WAIT_POLICY", "").strip().upper()
    return policy == "PASSIVE" or os.environ.get("GOMP_SPINCOUNT", "").strip() == "0"


def openmp_runtime() -> str | None:
    """File name of the OpenMP runtime loaded in this process (libgomp: GNU, libiomp5: Intel, libomp:
    LLVM), from /proc/self/maps; None when none is loaded or it cannot be told (not Linux)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        name = line.rsplit("/", 1)[-1]
        if name.startswith(("libgomp", "libiomp", "libomp")) and ".so" in name:
            return name
    return None


def info() -> dict:
    """What to record with a run: thread counts, CPUs, the wait-policy environment and whether it took effect."""
    out: dict = {
        "available_cpus": available_cpus(),
        "affinity_cpus": affinity_cpus(),
        "cgroup_cpu_limit": cgroup_cpu_limit(),
        "wait_env": {k: os.environ[k] for k in USER_WAIT_KEYS if k in os.environ},
        "wait_env_set_by_us": dict(_state["env_set"]),
        "passive_wait_in_effect": wait_policy_in_effect(),
        "openmp_runtime": openmp_runtime(),
    }
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        out["intra_op_threads"] = torch.get_num_threads()
        out["inter_op_threads"] = torch.get_num_interop_threads()
    return out
