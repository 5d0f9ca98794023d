"""Contention: how much slower a stage runs beside one competing CPU-bound process.

    python -m experiments.benchmarks.contention [--quick] [--json PATH] [--stages S ...] [--settings T ...]
                                                [--competitors C ...] [--threads N] [--max-minutes M]

Stages (each "step" is one unit of the stage's real work, on CPU, fp32):

- ``train-effnet``: a full fine-tuning optimizer step of EfficientNet-Lite0 on Fashion-MNIST
  (batch 32, 64 px), the loop of :func:`adapters.train.train` (AdamW, clipping) without the
  bookkeeping; ``train-minilm``: the same for all-MiniLM-L6-v2 on WordNet glosses (the default job).
- ``grid-minilm``: one point of :class:`landscape.engine.grid.PlaneEvaluator` (paper chart through three
  synthetic solutions: base + 1 % noise on every adapted weight and the head), 256 WordNet test
  samples in batches of 128, points cycled over a 3 × 3 patch of the plane.

Thread settings, each in its own worker process (the OpenMP wait policy is read when ``torch``
loads, so it cannot change inside one process):

- ``ours``: what the toolkit does (:mod:`adapters.threads`: ``OMP_WAIT_POLICY=PASSIVE`` in the
  environment before ``import torch``, then ``configure(--threads)``: intra-op threads =
  available CPUs unless given).
- ``defaults``: torch as it comes (``torch`` imported first, no wait policy, torch's own thread count).
- optional: ``one-thread`` (ours with 1 thread), ``threads-only`` (``configure()`` thread count
  but torch's default spinning), ``spinN`` (``configure()`` threads, ``GOMP_SPINCOUNT=N``: idle
  threads spin N ``pause`` iterations, then sleep; ours is N = 0).

Competitors, started once with ``subprocess`` (each in a session of its own, like another run
started from another shell) and kept paused (SIGSTOP) except while a
"beside" measurement runs (SIGCONT), killed in a ``finally``:

- ``torch``: another toolkit-like run with torch defaults: EfficientNet-Lite0 full fine-tuning
  steps in a loop (what the issue saw: other runs of the toolkit);
- ``busy``: a pure Python busy loop (one CPU-bound thread);
- optional: ``torch-ours`` (the same training loop with our settings: two fixed toolkit runs side by
  side), ``numpy`` (``a @ a`` in a loop on numpy's OpenBLAS threads).

Schedule: ``reps`` rounds; in each round, per stage, every settings' worker (order rotated by
round) runs the stage alone, then beside each competitor in turn, each measurement running
steps until ``--max-steps`` or its time budget is used (at least one step). Seconds per step =
total wall time / total steps over the rounds; slowdown = beside / alone of the same settings.
Other load on the machine (the project's machine is shared) is recorded as the load average
before and after; interleaving alone and beside measurements spreads it over both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from adapters import threads  # sets the OpenMP wait policy in os.environ; torch is imported lazily below

PROG = "python -m experiments.benchmarks.contention"
ROOT = Path(__file__).resolve().parents[2]
STAGES = ("train-effnet", "train-minilm", "grid-minilm")
SETTINGS = ("ours", "defaults", "one-thread", "threads-only", "spinN")  # spinN: e.g. spin1000
COMPETITORS = ("torch", "busy", "torch-ours", "numpy")
PRESETS = {
    "quick": {
        "stages": ("train-effnet", "grid-minilm"),
        "reps": 2,
        "alone_s": 3.0,
        "beside_s": 6.0,
        "max_minutes": 8.0,
    },
    "full": {"stages": STAGES, "reps": 3, "alone_s": 6.0, "beside_s": 12.0, "max_minutes": 30.0},
}
TARGET_SLOWDOWN = 2.5  # the issue: at most ~2.5x slower beside one competing CPU-bound process
# Environment variables that decide threads or waiting: removed from every process we start, so
# "defaults" means torch as it comes and "ours" means what adapters.threads sets.
THREAD_ENV = threads.USER_WAIT_KEYS + ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
WORKER_CODE = (
    "import sys; from experiments.benchmarks.contention import worker_main; sys.exit(worker_main(sys.argv[1:]))"
)


# --------------------------------------------------------------------------- machine


def cpu_model() -> dict:
    """CPU model name and AVX-512 support from /proc/cpuinfo."""
    from adapters.precision import cpu_flags, cpu_model_name

    name = cpu_model_name() or platform.processor() or "unknown"
    return {"cpu_model": name, "avx512": "avx512f" in cpu_flags(), "logical_cpus": os.cpu_count()}


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------- stages (in the workers)


def train_stage(model_name: str, dataset: str, batch_size: int = 32, seed: int = 0) -> Callable[[], None]:
    """One full fine-tuning optimizer step per call (the loop of adapters.train.train)."""
    import torch
    import torch.nn.functional as F

    from adapters.data import load_dataset
    from adapters.methods import MethodSpec, attach
    from adapters.models import get_model
    from adapters.train import TrainConfig, batch_indices, make_optimizer

    entry = get_model(model_name)
    data = load_dataset(dataset, seed=seed)
    encoded, labels = entry.encode(data.train.inputs), data.train.labels
    model = attach(entry.create(data.classes), MethodSpec("ft"), entry.targets).train()
    config = TrainConfig(batch_size=batch_size, lr=entry.defaults.get("lr", {}).get("ft", 1e-4), seed=seed)
    optimizer = make_optimizer(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batches = batch_indices(len(labels), batch_size, seed, encoded.lengths)

    def step() -> None:
        index = next(batches)
        inputs = encoded.batch(index)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(**inputs).float(), labels[index])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        optimizer.step()

    return step


def grid_stage(model_name: str, dataset: str, samples: int = 256, seed: int = 0) -> Callable[[], None]:
    """One plane point per call: PlaneEvaluator over synthetic solutions (module docstring)."""
    import copy
    import itertools

    import torch

    from adapters.data import eval_subset, load_dataset
    from adapters.methods.budget import adapted_weights
    from adapters.models import HEAD, get_model
    from landscape.engine.grid import EvalSet, PlaneEvaluator
    from landscape.engine.plane import SOLUTIONS, build_chart, solution_weights

    entry = get_model(model_name)
    data = load_dataset(dataset, seed=seed)
    model = entry.create(data.classes).eval()
    split = eval_subset(data.test, samples, seed)
    eval_set = EvalSet.prepare(entry.encode(split.inputs), split.labels, 128, "cpu")
    params = dict(model.named_parameters())
    names = list(adapted_weights(model, entry.targets)) + [n for n in params if n.startswith(HEAD + ".")]
    generator = torch.Generator().manual_seed(seed)

    def noise(p: torch.Tensor) -> torch.Tensor:
        scale = float(p.detach().float().pow(2).mean().sqrt()) or 1.0
        return 1e-2 * scale * torch.randn(p.shape, generator=generator)

    deltas = {s: {n: noise(params[n]) for n in names} for s in SOLUTIONS}
    chart = build_chart("paper", solution_weights(params, deltas))
    evaluator = PlaneEvaluator(copy.deepcopy(model), chart, eval_set, "cpu")
    points = itertools.cycle([(x, y) for y in (-0.25, 0.25, 0.75) for x in (-0.25, 0.5, 1.25)])

    def step() -> None:
        evaluator.evaluate(*next(points))

    return step


BUILDERS: dict[str, Callable[[], Callable[[], None]]] = {
    "train-effnet": lambda: train_stage("efficientnet-lite0", "fashion-mnist"),
    "train-minilm": lambda: train_stage("minilm", "wordnet"),
    "grid-minilm": lambda: grid_stage("minilm", "wordnet"),
}


def measure(step: Callable[[], None], max_steps: int, budget_s: float) -> dict:
    """Steps until ``max_steps`` or ``budget_s`` seconds (at least one): wall and process CPU seconds."""
    start, cpu, n = time.perf_counter(), time.process_time(), 0
    while n < max_steps and (n == 0 or time.perf_counter() - start < budget_s):
        step()
        n += 1
    return {"steps": n, "wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}


def worker_main(argv: list[str]) -> int:
    """A worker: builds its stages, warms each up, says ``ready`` (one JSON line), then either
    competes (``--compete``: runs its first stage forever) or serves measurement requests read
    from stdin, one JSON line each, answering on stdout."""
    parser = argparse.ArgumentParser(prog=f"{PROG} (worker)")
    parser.add_argument("--settings", type=settings_arg, required=True)
    parser.add_argument("--stages", nargs="+", choices=STAGES, required=True)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compete", action="store_true")
    args = parser.parse_args(argv)
    out = sys.stdout
    sys.stdout = sys.stderr  # library prints must not mix with the protocol
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if args.settings in ("ours", "threads-only") or args.settings.startswith("spin"):
        threads.configure(args.threads)
    elif args.settings == "one-thread":
        threads.configure(1)

    def send(message: dict) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    stages = {}
    for name in args.stages:
        stages[name] = BUILDERS[name]()
        stages[name]()  # warm-up
    send({"ready": True, "torch": torch.__version__, "threads": threads.info()})
    if args.compete:
        step = stages[args.stages[0]]
        while True:
            step()
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        send(measure(stages[request["stage"]], request["max_steps"], request["budget_s"]))
    return 0


# --------------------------------------------------------------------------- processes (in the driver)


def settings_arg(text: str) -> str:
    """argparse type of a settings name: one of :data:`SETTINGS`, ``spinN`` with N a number."""
    if text in SETTINGS[:-1] or (text.startswith("spin") and text[4:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"unknown settings {text!r}: choose from {', '.join(SETTINGS)}")


def child_env(settings: str | None = None) -> dict[str, str]:
    """The environment of a process we start: no thread or wait variables, except GOMP_SPINCOUNT=N
    for ``spinN`` (libgomp spins N pause iterations before sleeping; threads from configure())."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENV}
    if settings and settings.startswith("spin"):
        env["GOMP_SPINCOUNT"] = settings[4:]
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


class Proc:
    """A started process with its stderr in a log file."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        logs: Path,
        stdin: bool = False,
        settings: str | None = None,
        session: bool = False,
    ):
        """``session``: start it in a session of its own, like a run started from another shell (with
        the kernel's autogroup scheduling, each session gets its own share of the CPUs)."""
        self.name = name
        self.log = logs / f"{name}.log"
        with open(self.log, "wb") as err:
            self.popen = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=child_env(settings),
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=session,
            )
        self.ready: dict = {}

    def read(self) -> dict:
        line = self.popen.stdout.readline()
        if not line:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited (status {self.popen.poll()}):\n{tail}")
        return json.loads(line)

    def request(self, message: dict) -> dict:
        self.popen.stdin.write(json.dumps(message) + "\n")
        self.popen.stdin.flush()
        return self.read()

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()  # SIGKILL also ends a stopped process
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def worker_cmd(settings: str, stages: list[str], threads_arg: int | None, compete: bool = False) -> list[str]:
    # "defaults": torch is imported before anything of ours, so the wait policy we would set comes too late.
    code = ("import torch; " if settings in ("defaults", "threads-only") else "") + WORKER_CODE
    cmd = [sys.executable, "-c", code, "--settings", settings, "--stages", *stages]
    if threads_arg is not None:
        cmd += ["--threads", str(threads_arg)]
    return cmd + (["--compete"] if compete else [])


def competitor_cmd(kind: str) -> list[str]:
    if kind == "torch":
        return worker_cmd("defaults", ["train-effnet"], None, compete=True)
    if kind == "torch-ours":
        return worker_cmd("ours", ["train-effnet"], None, compete=True)
    if kind == "busy":
        code = "import sys; print('{\"ready\": true}', flush=True)\nwhile True: pass"
    else:  # numpy
        code = (
            "import numpy as np; a = np.random.default_rng(0).random((1024, 1024)); a @ a\n"
            "print('{\"ready\": true}', flush=True)\nwhile True: a @ a"
        )
    return [sys.executable, "-c", code]


# --------------------------------------------------------------------------- driver


def start_processes(args, stages: list[str], logs: Path, procs: list[Proc], log) -> tuple[dict, dict]:
    """The competitors (stopped once ready) and one worker per settings (ready: models built); each is added to
    ``procs`` as soon as it starts, so the caller kills every one of them whatever happens."""
    competitors = {}
    for kind in args.competitors:
        competitors[kind] = Proc(f"competitor-{kind}", competitor_cmd(kind), logs, session=True)
        procs.append(competitors[kind])
    workers = {}
    for s in args.settings:
        workers[s] = Proc(f"worker-{s}", worker_cmd(s, stages, args.threads), logs, stdin=True, settings=s)
        procs.append(workers[s])
    log(f"starting {len(workers)} workers and {len(competitors)} competitors (building models) ...")
    for c in competitors.values():
        c.ready = c.read()
        c.signal(signal.SIGSTOP)
    for w in workers.values():
        w.ready = w.read()
    return workers, competitors


def measure_beside(worker: Proc, competitor: Proc | None, stage: str, max_steps: int, budget: float) -> dict:
    """One measurement of ``stage`` by ``worker``, alone or with ``competitor`` running beside it."""
    if competitor is not None:
        competitor.signal(signal.SIGCONT)
        time.sleep(0.3)  # let it get going
    try:
        return worker.request({"stage": stage, "max_steps": max_steps, "budget_s": budget})
    finally:
        if competitor is not None:
            competitor.signal(signal.SIGSTOP)


def rounds(args, stages, reps, preset, deadline, workers, competitors, result, log) -> bool:
    """Every round of every stage, settings and condition into ``result["measurements"]``; True when cut by the
    deadline."""
    timed_out = False
    for rep in range(reps):  # rounds outermost: a --max-minutes cut loses late rounds, not whole stages
        for stage in stages:
            order = args.settings[rep % len(args.settings) :] + args.settings[: rep % len(args.settings)]
            for s in order:
                for cond in ["alone", *competitors]:
                    if time.monotonic() > deadline:
                        timed_out = True
                        break
                    competitor = competitors.get(cond)
                    budget = preset["alone_s"] if competitor is None else preset["beside_s"]
                    m = measure_beside(workers[s], competitor, stage, args.max_steps, budget)
                    m.update(stage=stage, settings=s, condition=cond, rep=rep, loadavg=loadavg())
                    result["measurements"].append(m)
                    log(
                        f"  {stage:13s} {s:12s} {cond:11s} rep {rep}: {m['steps']:3d} steps "
                        f"{m['wall_s'] / m['steps']:8.3f} s/step (cpu {m['cpu_s'] / m['steps']:.3f})"
                    )
    return timed_out


def quit_workers(workers: dict) -> None:
    for w in workers.values():
        try:
            w.popen.stdin.write(json.dumps({"quit": True}) + "\n")
            w.popen.stdin.flush()
        except OSError:
            pass


def run(args, log=print) -> dict:
    preset = dict(PRESETS["quick" if args.quick else "full"])
    for key in ("alone_s", "beside_s"):
        if getattr(args, key, None):
            preset[key] = getattr(args, key)
    stages = args.stages or list(preset["stages"])
    reps = args.reps or preset["reps"]
    deadline = time.monotonic() + 60 * (args.max_minutes or preset["max_minutes"])
    started = time.perf_counter()
    result: dict = {
        "benchmark": "contention",
        "quick": args.quick,
        **cpu_model(),
        "available_cpus": threads.available_cpus(),
        "python": platform.python_version(),
        "stages": stages,
        "settings": args.settings,
        "competitors": args.competitors,
        "reps": reps,
        "alone_budget_s": preset["alone_s"],
        "beside_budget_s": preset["beside_s"],
        "loadavg_before": loadavg(),
        "measurements": [],
    }
    procs: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="contention-") as folder:
        try:
            workers, competitors = start_processes(args, stages, Path(folder), procs, log)
            result["torch"] = next(iter(workers.values())).ready.get("torch")
            result["worker_threads"] = {s: w.ready.get("threads") for s, w in workers.items()}
            result["timed_out"] = rounds(args, stages, reps, preset, deadline, workers, competitors, result, log)
            quit_workers(workers)
        finally:
            for p in procs:
                p.kill()
    result["loadavg_after"] = loadavg()
    result["wall_s"] = time.perf_counter() - started
    result["cases"] = summarize(result["measurements"])
    return result


def summarize(measurements: list[dict]) -> list[dict]:
    """Per (stage, settings): seconds per step alone and beside each competitor, slowdowns."""
    totals: dict = {}
    for m in measurements:
        t = totals.setdefault((m["stage"], m["settings"]), {}).setdefault(m["condition"], [0, 0.0, 0.0])
        t[0] += m["steps"]
        t[1] += m["wall_s"]
        t[2] += m["cpu_s"]
    cases = []
    for (stage, settings), conds in totals.items():
        case = {"stage": stage, "settings": settings}
        for cond, (steps, wall, cpu) in conds.items():
            case[cond] = {"steps": steps, "s_per_step": wall / steps, "cpu_s_per_step": cpu / steps}
        if "alone" in conds:
            alone = case["alone"]["s_per_step"]
            case["slowdown"] = {c: case[c]["s_per_step"] / alone for c in conds if c != "alone"}
        cases.append(case)
    defaults_alone = {
        c["stage"]: c["alone"]["s_per_step"] for c in cases if c["settings"] == "defaults" and "alone" in c
    }
    for c in cases:
        if "alone" in c and c["stage"] in defaults_alone:
            c["alone_vs_defaults"] = c["alone"]["s_per_step"] / defaults_alone[c["stage"]]
    best_alone: dict = {}
    for c in cases:
        if "alone" in c:
            best_alone[c["stage"]] = min(best_alone.get(c["stage"], float("inf")), c["alone"]["s_per_step"])
    for c in cases:
        c["slowdown_vs_best_alone"] = {
            k: c[k]["s_per_step"] / best_alone[c["stage"]] for k in c.get("slowdown", {}) if c["stage"] in best_alone
        }
        if c["settings"] == "ours" and c.get("slowdown"):
            c["target_met"] = all(v <= TARGET_SLOWDOWN for v in c["slowdown"].values())
    return cases


def table(result: dict) -> str:
    comps = result["competitors"]
    head = f"{'stage':13s} {'settings':12s} {'thr':>3s} {'passive':>7s} {'alone s/step':>12s} {'/defaults':>9s}"
    for c in comps:
        head += f" {'beside ' + c:>17s} {'slowdown':>8s}"
    lines = [head]
    for case in result["cases"]:
        info = (result.get("worker_threads") or {}).get(case["settings"]) or {}
        alone = case.get("alone", {}).get("s_per_step", float("nan"))
        row = (
            f"{case['stage']:13s} {case['settings']:12s} {info.get('intra_op_threads', '?')!s:>3s} "
            f"{'yes' if info.get('passive_wait_in_effect') else 'no':>7s} {alone:12.3f} "
            f"{case.get('alone_vs_defaults', float('nan')):8.2f}x"
        )
        for c in comps:
            beside = case.get(c, {}).get("s_per_step", float("nan"))
            slow = case.get("slowdown", {}).get(c, float("nan"))
            row += f" {beside:17.3f} {slow:7.2f}x"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="train-effnet and grid-minilm, 2 rounds, short budgets")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--stages", nargs="+", choices=STAGES, help="default: quick: train-effnet grid-minilm; all")
    parser.add_argument(
        "--settings",
        nargs="+",
        type=settings_arg,
        default=["ours", "defaults"],
        help="ours, defaults, one-thread, threads-only, spinN (default: ours defaults)",
    )
    parser.add_argument(
        "--competitors", nargs="*", choices=COMPETITORS, default=["torch", "busy"], help="none: alone only"
    )
    parser.add_argument("--alone-s", type=float, default=None, help="time budget of an alone measurement")
    parser.add_argument("--beside-s", type=float, default=None, help="time budget of a beside measurement")
    parser.add_argument("--threads", type=int, default=None, help="threads of 'ours' (default: available CPUs)")
    parser.add_argument("--reps", type=int, default=None, help="rounds per stage (quick 2, full 3)")
    parser.add_argument("--max-steps", type=int, default=20, help="most steps per measurement (default 20)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop measuring after this (quick 8, full 30)")
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be >= 1")
    result = run(args, log=lambda s: print(s, file=sys.stderr, flush=True))
    print(
        f"{result['cpu_model']} (AVX-512: {'yes' if result['avx512'] else 'no'}), "
        f"{result['available_cpus']} available CPUs, torch {result.get('torch')}; "
        f"load average before {result['loadavg_before']}, after {result['loadavg_after']}"
    )
    print(table(result))
    for case in result["cases"]:
        if "target_met" in case:
            verdict = "met" if case["target_met"] else "MISSED"
            print(f"target (ours <= {TARGET_SLOWDOWN}x beside each competitor) {case['stage']}: {verdict}")
    if result.get("timed_out"):
        print(f"stopped early: --max-minutes reached after {result['wall_s']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
