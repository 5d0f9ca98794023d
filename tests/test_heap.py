"""adapters.heap: inside the training policy a freed block's pages are reused without faulting, and on exit
the heap's free memory goes back to the system. Measured with the kernel's own counters (getrusage's minor
page faults, /proc/self/statm's resident pages), not with the module's view of itself."""

from __future__ import annotations

import functools
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapters import heap

BLOCK = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB): mmapped per allocation by default
PAGE = resource.getpagesize()

pytestmark = pytest.mark.skipif(not heap.applies(), reason="glibc without a user malloc policy only")


# Measured in a fresh process, so the heap's state is the test's own (an earlier test's freed memory would serve
# the blocks without a fault). Prints JSON: the faults of each cycle (allocate a BLOCK, write every page, free it)
# under glibc's defaults, then inside kept_freed_memory(), and the resident bytes of an 8-BLOCK buffer freed
# inside: kept while inside, left after the exit.
CYCLES = """
import json, resource, torch
from adapters import heap

def faults(fn):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

def cycle(blocks=1):
    t = torch.empty(blocks * {block} // 4)
    t.fill_(1.0)
    del t

default = [faults(cycle) for _ in range(16)]
with heap.kept_freed_memory() as applied:
    inside = [faults(cycle) for _ in range(16)]
    before = resident()
    cycle(8)
    kept = resident() - before
left = resident() - before
print(json.dumps({{"applied": applied, "default": default, "inside": inside, "kept": kept, "left": left}}))
"""


def _fresh(code: str, **env: str):
    """Run ``code`` in a fresh Python process (this repository, one thread, ``env`` added); its last line as JSON."""
    inherited = {k: v for k, v in os.environ.items() if k != heap.SWITCH}  # the switch only where a test sets it
    environ = {**inherited, "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@functools.cache
def _cycles_run(env: tuple[tuple[str, str], ...]) -> dict:
    return _fresh(CYCLES.format(block=BLOCK), **dict(env))


def _cycles(**env: str) -> dict:
    """:data:`CYCLES` (one run per environment, shared by the tests that read it); skips where the kernel backs the
    blocks with huge pages (no per-page faults to save)."""
    out = _cycles_run(tuple(sorted(env.items())))
    if min(out["default"]) < BLOCK // PAGE:
        pytest.skip("transparent huge pages serve these blocks")
    return out


def test_freed_blocks_are_reused_without_page_faults():
    out = _cycles()
    pages = BLOCK // PAGE
    assert out["applied"]
    assert min(out["default"]) >= pages  # every block is mapped afresh and faulted in, page by page
    # The first few blocks may fault (seen: up to 4 of 8): small allocations settle into a freed block's space
    # and the next block goes above it. Once there is room for both, the same pages serve every block.
    assert sum(out["inside"]) <= 0.5 * sum(out["default"])
    assert sum(out["inside"][8:]) <= 0.25 * sum(out["default"][8:])


def test_exit_returns_kept_memory():
    out = _cycles()
    assert out["kept"] >= 7 * BLOCK  # freed, but still resident inside
    assert out["left"] <= BLOCK  # handed back on exit


@pytest.mark.parametrize("key, value", [("MALLOC_MMAP_MAX_", "65536"), (heap.SWITCH, "0")])
def test_a_user_malloc_policy_or_the_switch_leaves_glibc_alone(key, value):
    out = _cycles(**{key: value})
    assert not out["applied"]
    assert min(out["inside"]) >= BLOCK // PAGE  # as under glibc's defaults: every block faulted in afresh


# The model of the training and evaluation scripts below: its hidden activation is 4096 floats per row.
WIDE = """class Wide(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(64, 4096), torch.nn.Linear(4096, 4)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))
"""


# One training run in a fresh process (the heap's state is the test's, not left by earlier tests): a model whose
# hidden activation and its gradient are each one BLOCK per step, 16 steps; prints each step's minor faults. With
# ``packed`` its first layer is a frozen bitsandbytes NF4 layer (quantised on the CPU), as under QLoRA.
TRAINING = """
import json, resource, torch
from adapters import train as T
from adapters.models.base import Encoded

{wide}
rows = {rows}
torch.manual_seed(0)
data, labels = Encoded({{"x": torch.randn(rows, 64)}}), torch.randint(0, 4, (rows,))
faults, last = [], [resource.getrusage(resource.RUSAGE_SELF).ru_minflt]
step = T._step

def counted(*args, **kwargs):
    step(*args, **kwargs)
    now = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    faults.append(now - last[0])
    last[0] = now

T._step = counted
model = Wide()
if {packed}:
    import bitsandbytes as bnb
    from adapters.quant import disable_cpu_repacking
    up = bnb.nn.Linear4bit(64, 4096, compute_dtype=torch.float32, quant_type="nf4")
    up.load_state_dict(model.up.state_dict())
    model.up = up.to("cpu").requires_grad_(False)  # quantised here
    disable_cpu_repacking(model)
T.train(model, data, labels, T.TrainConfig(steps=16, batch_size=rows), progress=False)
print(json.dumps(faults))
"""


def _training_faults(switch: str | None, packed: bool = False) -> list[int]:
    env = {} if switch is None else {heap.SWITCH: switch}
    return _fresh(TRAINING.format(wide=WIDE, rows=BLOCK // 4 // 4096, packed=packed), **env)


def test_cpu_training_keeps_its_freed_memory():
    """adapters.train.train applies the policy (the default rule, to a dense model): from the few steps on, a step's
    activations fault nothing; ``0`` leaves it to glibc."""
    kept, default = _training_faults(None), _training_faults("0")
    pages = BLOCK // PAGE
    assert min(default[8:]) >= 2 * pages  # glibc's defaults: each step maps its activation and gradient afresh
    # kept: the second half of the run reuses the first half's pages (seen: at most 4 blocks faulted in 8 steps)
    assert sum(kept[8:]) <= 0.25 * sum(default[8:])


def test_cpu_training_keeps_freed_memory_unless_the_base_is_packed_4bit():
    model = torch.nn.Sequential(torch.nn.Linear(64, 4096), torch.nn.Linear(4096, 4))
    assert heap.worth_keeping(model, "cpu")
    assert not heap.worth_keeping(model, "cuda")
    model[0].requires_grad_(False)  # an adapter's training: most weights frozen
    assert heap.worth_keeping(model, "cpu")
    bnb = pytest.importorskip("bitsandbytes")
    packed = bnb.nn.Linear4bit(64, 4096, compute_dtype=torch.float32, quant_type="nf4")
    packed.load_state_dict(model[0].state_dict())
    model[0] = packed.to("cpu")  # quantised here
    assert not heap.worth_keeping(model, "cpu")


def test_on_a_4bit_base_glibc_keeps_its_defaults_unless_the_switch_is_one():
    """The rule leaves training on a packed base to glibc (each step maps its activation afresh); ``1`` applies the
    policy there too."""
    pytest.importorskip("bitsandbytes")
    rule, forced = _training_faults(None, packed=True), _training_faults("1", packed=True)
    assert min(rule[8:]) >= BLOCK // PAGE
    assert sum(forced[8:]) <= 0.25 * sum(rule[8:])


# The plane's evaluation in a fresh process: the same wide model, 16 points along a line, one batch whose hidden
# activation is one BLOCK; prints each point's minor faults.
EVALUATION = """
import json, resource, torch
from landscape.engine.grid import EvalSet, PlaneEvaluator
from landscape.engine.plane import Chart

{wide}
rows = {rows}
torch.manual_seed(0)
model = Wide()
w = {{n: p.detach().clone() for n, p in model.named_parameters()}}
chart = Chart("line", w, {{n: 1e-3 * torch.randn_like(t) for n, t in w.items()}},
              {{n: torch.zeros_like(t) for n, t in w.items()}}, {{}})
evals = EvalSet([({{"x": torch.randn(rows, 64)}}, torch.randint(0, 4, (rows,)))], rows)
faults, last = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in PlaneEvaluator(model, chart, evals, "cpu").evaluate_iter([(i / 16, 0.0) for i in range(16)]):
    now = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    faults.append(now - last)
    last = now
print(json.dumps(faults))
"""


def test_evaluation_on_the_cpu_keeps_the_memory_a_point_frees():
    """The plane's engine applies the policy around its points: a point's activation is the last one's pages."""
    script = EVALUATION.format(wide=WIDE, rows=BLOCK // 4 // 4096)
    kept, default = _fresh(script), _fresh(script, **{heap.SWITCH: "0"})
    assert min(default[8:]) >= BLOCK // PAGE  # glibc's defaults: each point maps its hidden activation afresh
    assert sum(kept[8:]) <= 0.25 * sum(default[8:])
