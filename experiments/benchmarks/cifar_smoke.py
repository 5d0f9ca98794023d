"""Benchmark: the CIFAR-100 smoke run (issue 20) through the real command line, per-stage time and peak RSS.

    python -m experiments.benchmarks.cifar_smoke [--json PATH] [--dtype float32|bfloat16|auto]
                                                 [--threads N] [--keep DIR] [--avx2] [--batch-size N]

What it runs: ``python -m landscape.connectivity --dataset cifar100`` (the paper preset: ViT-B/32, both
encoders, FT / LoRA r = 32 / RandLoRA r = 6) on CIFAR-100 files fabricated offline (the original Python
pickles, 200 train and 50 test images: no download), with random-init weights (``--pretrained none``:
the openai weights cannot be fetched here), 2 training steps, a 3 × 3 grid, 16 evaluation samples and 21
points per path. ``--dtype float32`` (default) budgets for a CPU without native bf16, where bf16 autocast
is several times slower than fp32; ``--avx2`` also restricts torch/MKL/oneDNN and OpenBLAS to
AVX2 (the README's emulation of such a machine: :data:`AVX2_ENV`). ``--batch-size N`` trains at N images a step
instead of the preset's 128: a smaller smoke than the issue's, to say what would fit a machine's budget (the table
and the JSON's ``batch_size`` name it).

How it measures: the run is a fresh child process (``--child``) that calls ``landscape.connectivity.main``
with those arguments and wraps each stage of :class:`landscape.cli.Stages`: before a stage the kernel's
peak-RSS counter is reset (``/proc/self/clear_refs`` ← 5), after it ``VmHWM`` is read, so each stage's peak
RSS is its own (the memory already held counts in it), and its CPU time (all threads: on a shared machine a
measure that other work does not inflate; wall ≈ CPU / threads when the run has the cores to itself), the
kernel's share of it and its minor page faults (``getrusage``). The parent prints a table of stage, seconds,
CPU and system seconds, faults and peak RSS, the whole run's wall time and peak, and the CPU; ``--json`` writes
them (atomic write).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from adapters.compat import tomllib

RUN_ARGS = ("--dataset", "cifar100", "--pretrained", "none", "--train-steps", "2", "--grid", "3",
            "--eval-samples", "16", "--path-points", "21", "--no-progress")  # fmt: skip
# torch's kernels, MKL, oneDNN, and numpy/scipy's OpenBLAS (the spectra's LAPACK), each held to AVX2
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "OPENBLAS_CORETYPE": "Haswell"}  # fmt: skip
BUDGET_S = 300.0  # issue 20: ≤ 5 min on 2 cores
PRESET = Path(__file__).resolve().parents[1] / "paper" / "cifar100.toml"  # the run's preset (--dataset cifar100)
PRESET_BATCH = tomllib.loads(PRESET.read_text())["train"]["batch_size"]  # the smoke trains at it
TRAIN_IMAGES, TEST_IMAGES = 200, 50  # the fabricated CIFAR-100 splits


def cpu_name() -> str:
    """The CPU (:func:`adapters.precision.cpu_description`) and its core count."""
    from adapters.precision import cpu_description

    return f"{cpu_description()}, {os.cpu_count()} cores"


def _vm(field: str) -> int:
    """A /proc/self/status memory field in bytes (0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process to its current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def child(argv: list[str], report: Path) -> int:
    """Run the CLI in this process, recording each stage's wall time and peak RSS into ``report`` (JSON)."""
    import contextlib

    from landscape import cli, connectivity

    stages: dict[str, dict] = {}
    original = cli.Stages.__call__

    @contextlib.contextmanager
    def measured(self, name: str):
        _reset_peak()
        start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        with original(self, name):
            yield
        after = resource.getrusage(resource.RUSAGE_SELF)
        entry = stages.setdefault(name, {"seconds": 0.0, "cpu_s": 0.0, "system_s": 0.0, "minor_faults": 0,
                                         "peak_rss_bytes": 0})  # fmt: skip
        system = after.ru_stime - before.ru_stime  # the kernel's share: mostly zeroing memory touched first
        entry["seconds"] = round(entry["seconds"] + time.perf_counter() - start, 3)
        # all threads, user + system: on a shared machine a measure that other work does not inflate
        entry["cpu_s"] = round(entry["cpu_s"] + after.ru_utime - before.ru_utime + system, 3)
        entry["system_s"] = round(entry["system_s"] + system, 3)
        entry["minor_faults"] += after.ru_minflt - before.ru_minflt
        entry["peak_rss_bytes"] = max(entry["peak_rss_bytes"], _vm("VmHWM"))

    cli.Stages.__call__ = measured
    start, cpu = time.perf_counter(), time.process_time()
    code = connectivity.main(argv)
    report.write_text(json.dumps({"code": code, "stages": stages, "seconds": round(time.perf_counter() - start, 3),
                                  "cpu_s": round(time.process_time() - cpu, 3)}))  # fmt: skip
    return code


def run(dtype: str, threads: int, out: Path, avx2: bool, batch_size: int | None = None) -> dict:
    """Fabricate the data under ``out``, run the smoke in a child process and return its measurements
    (``batch_size``: images per training step; None: the preset's)."""
    from tests.fakes import write_cifar100  # the tests' CIFAR-100 fabricator: the original pickle layout

    data = out / "data"
    write_cifar100(data, n_train=TRAIN_IMAGES, n_test=TEST_IMAGES)
    argv = [*RUN_ARGS, "--data-root", str(data), "--dtype", dtype, "--threads", str(threads), "--out", str(out / "run")]
    if batch_size is not None:
        argv += ["--batch-size", str(batch_size)]
    report = out / "child.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(AVX2_ENV if avx2 else {})}
    cmd = [sys.executable, "-m", "experiments.benchmarks.cifar_smoke", "--child", str(report), "--", *argv]
    log = out / "child.log"  # the run's own messages, as they come (stage by stage)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[2], stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not report.exists():
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"the smoke run failed (exit {proc.returncode})")
    got = json.loads(report.read_text())
    stages = got["stages"]
    meta = json.loads((out / "run" / "landscape.json").read_text())
    return {
        "command": " ".join(["python -m landscape.connectivity", *argv]),
        "cpu": cpu_name() + (" restricted to AVX2" if avx2 else ""),
        "threads": threads,
        "dtype": dtype,
        "batch_size": batch_size or PRESET_BATCH,
        "stages": stages,
        "wall_s": round(wall, 1),
        "cli_s": got["seconds"],
        "cli_cpu_s": got.get("cpu_s"),
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after: other work
        "peak_rss_bytes": max((s["peak_rss_bytes"] for s in stages.values()), default=0),
        "budget_s": BUDGET_S,
        "within_budget": wall <= BUDGET_S,
        "landscape_dtype": meta.get("config", {}).get("dtype"),
    }


def table(result: dict) -> str:
    batch = result.get("batch_size", PRESET_BATCH)
    size = "the issue's" if batch == PRESET_BATCH else f"smaller than the issue's {PRESET_BATCH}"
    lines = [f"CIFAR-100 smoke on {result['cpu']}, {result['threads']} threads, forward dtype {result['dtype']}, "
             f"training batch {batch} ({size})",
             f"  {result['command']}", f"  load average (1 min) before / after: {result['load_average_1min']}",
             "", f"{'stage':<16} {'seconds':>9} {'CPU s':>9} {'system s':>9} {'faults M':>9} "
             f"{'peak RSS GB':>12}"]  # fmt: skip
    for name, s in result["stages"].items():
        kernel = f"{s['system_s']:>9.1f} {s['minor_faults'] / 1e6:>9.2f}" if "system_s" in s else f"{'':>19}"
        lines.append(f"{name:<16} {s['seconds']:>9.1f} {s['cpu_s']:>9.1f} {kernel} {s['peak_rss_bytes'] / 1e9:>12.2f}")
    cpu = result["cli_cpu_s"]
    lines.append(f"{'whole process':<16} {result['wall_s']:>9.1f} {cpu:>9.1f} {'':>19} "
                 f"{result['peak_rss_bytes'] / 1e9:>12.2f}")  # fmt: skip
    verdict = "within" if result["within_budget"] else "OVER"
    lines.append(f"budget {result['budget_s']:.0f} s: {verdict} (process start and imports included)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:  # the measured process: --child REPORT -- CLI ARGS
        return child(argv[3:], Path(argv[1]))
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmarks.cifar_smoke", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--json", type=Path, help="write the measurements here")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"),
                        help="the landscape's forward precision (float32: a CPU without native bf16)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="run under this folder and keep it (default: a temporary one)")
    parser.add_argument(
        "--avx2", action="store_true", help="restrict torch/MKL/oneDNN and numpy/scipy's OpenBLAS to AVX2 (AVX2_ENV)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help=f"images per training step (default: the preset's {PRESET_BATCH}, the issue's smoke)",
    )
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run(args.dtype, args.threads, args.keep, args.avx2, args.batch_size)
    else:
        with tempfile.TemporaryDirectory(prefix="cifar_smoke_") as tmp:
            result = run(args.dtype, args.threads, Path(tmp), args.avx2, args.batch_size)
    print(table(result))
    if args.json is not None:
        from landscape.engine import store

        store.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
