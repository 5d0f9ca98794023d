"""CPU training with and without :mod:`adapters.heap`'s policy (freed memory kept for the next step), side by side.

    python -m experiments.benchmarks.heap_policy [--method ft] [--steps 3] [--pairs 3] [--avx2] [--json PATH]

Each arm is a fresh process that builds the CIFAR smoke's model (random-init CLIP ViT-B/32, 100 classes), attaches
``--method`` and trains it ``--steps`` steps of 128 fabricated 32 px images (augmented, as the paper preset)
through :func:`adapters.train.train`; the arms alternate (kept, default, kept, ...) so the machine's drift hits
both alike. Per arm: each step's wall time, the process's minor page faults, system and user CPU seconds over the
training, and its peak RSS. ``ADAPTERS_KEEP_FREED_MEMORY=1`` makes the kept arm (the policy, whatever the method),
``=0`` the default arm (glibc's own policy).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from adapters.io import atomic_path
from experiments.benchmarks.cifar_smoke import AVX2_ENV, cpu_name

ROOT = Path(__file__).resolve().parents[2]
RANKS = {"ft": 0, "lora": 32, "randlora": 6}  # the paper preset's CLIP ranks

ARM = """
import copy, json, resource, sys, time, torch
from adapters import heap, threads
from adapters import train as T
from adapters.methods import MethodSpec, attach
from adapters.models import clip
from tests.fakes import CIFAR_FINE_NAMES

method, steps, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
threads.configure(2)
torch.manual_seed(0)
classes = list(CIFAR_FINE_NAMES)
base = clip.build(len(classes), classes, arch="ViT-B-32", pretrained="none").eval()
model = attach(copy.deepcopy(base), MethodSpec(method, rank=rank, seed=0), clip.TARGETS)
data = clip.encode(torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8))
labels = torch.randint(0, 100, (256,))
ends, step = [], T._step

def timed(*args, **kwargs):
    step(*args, **kwargs)
    ends.append(time.perf_counter())

T._step = timed
before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
T.train(model, data, labels, T.TrainConfig(steps=steps, batch_size=128, lr=1e-5, augment=True), progress=False,
        augment=clip.make_augment(base.image_size))
after = resource.getrusage(resource.RUSAGE_SELF)
kept = heap.wanted(model, "cpu") and heap.applies()
print(json.dumps({"kept": kept, "steps_s": [round(b - a, 3) for a, b in zip([start] + ends[:-1], ends)],
                  "minor_faults": after.ru_minflt - before.ru_minflt,
                  "system_s": round(after.ru_stime - before.ru_stime, 2),
                  "user_s": round(after.ru_utime - before.ru_utime, 2), "peak_rss_bytes": after.ru_maxrss * 1024}))
"""


def arm(method: str, steps: int, kept: bool, avx2: bool) -> dict:
    """One fresh process's training (module docstring)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(AVX2_ENV if avx2 else {}),
           "ADAPTERS_KEEP_FREED_MEMORY": "1" if kept else "0"}  # fmt: skip
    cmd = [sys.executable, "-c", ARM, method, str(steps), str(RANKS[method])]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"arm failed: {done.stderr.strip().splitlines()[-1:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {**out, "seconds": round(sum(out["steps_s"]), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmarks.heap_policy", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--method", choices=sorted(RANKS), default="ft")
    parser.add_argument("--steps", type=int, default=3, help="training steps per arm (default 3)")
    parser.add_argument("--pairs", type=int, default=3, help="kept/default pairs, alternating (default 3)")
    parser.add_argument(
        "--avx2", action="store_true", help="restrict torch/MKL/oneDNN and OpenBLAS to AVX2 (cifar_smoke.AVX2_ENV)"
    )
    parser.add_argument("--json", type=Path, help="write the arms and their medians here (atomically)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.pairs < 1:
        parser.error("--steps and --pairs must be at least 1")
    if args.json and not os.access(args.json.parent, os.W_OK):
        parser.error(f"cannot write {args.json}: its folder does not exist or is not writable")
    arms: dict[str, list[dict]] = {"kept": [], "default": []}
    for pair in range(args.pairs):
        for name in ("kept", "default"):
            arms[name].append(arm(args.method, args.steps, name == "kept", args.avx2))
            a = arms[name][-1]
            print(f"pair {pair + 1} {name:8s} {a['seconds']:7.1f} s  steps {a['steps_s']}  faults "
                  f"{a['minor_faults'] / 1e6:.2f} M  system {a['system_s']:.1f} s  user {a['user_s']:.1f} s  "
                  f"peak {a['peak_rss_bytes'] / 2**30:.2f} GB", flush=True)  # fmt: skip
    medians = {name: {key: statistics.median(a[key] for a in runs)
                      for key in ("seconds", "minor_faults", "system_s", "user_s", "peak_rss_bytes")}
               for name, runs in arms.items()}  # fmt: skip
    ratio = medians["default"]["seconds"] / medians["kept"]["seconds"]
    print(f"median: kept {medians['kept']['seconds']:.1f} s, default {medians['default']['seconds']:.1f} s "
          f"({ratio:.2f}x); {cpu_name()}{', restricted to AVX2' if args.avx2 else ''}")  # fmt: skip
    if args.json:
        out = {"command": "python -m experiments.benchmarks.heap_policy " + " ".join(argv or sys.argv[1:]),
               "cpu": cpu_name(), "avx2": args.avx2, "method": args.method, "steps": args.steps,
               "arms": arms, "medians": medians, "speedup": round(ratio, 3)}  # fmt: skip
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
