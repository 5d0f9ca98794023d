"""``python -m landscape.curvature`` on a run in float64, then in float32, then ``--blocks`` in float64, in one
process or one torchrun launch.

``python -m tests.curvature_worker RUN OUT``: the command with :data:`FEW` settings, ``--hvp-dtype float64`` into
OUT/float64, then ``--hvp-dtype float32`` into OUT/float32, then with :data:`BLOCKS` into OUT/blocks, figures
built but not drawn (:mod:`tests.nodraw`).
Under torchrun the worker joins the gloo process group first, so both commands share it (the command leaves a
group it did not start up): one launch pays the processes' imports and loading once for both precisions.
"""

from __future__ import annotations

import os
import sys

# a few products: 13 samples split 6 / 7 over two ranks (unequal shards: their weights matter)
FEW = ["--solutions", "lora", "randlora", "--coordinates", "adapter", "--top-k", "2", "--trace-probes", "3",
       "--slq-probes", "1", "--slq-steps", "6", "--samples", "13", "--no-progress"]  # fmt: skip
BLOCKS = ["--blocks", "--hvp-dtype", "float64", "--solutions", "lora", "--coordinates", "adapter", "--top-k", "1",
          "--trace-probes", "2", "--slq-probes", "1", "--slq-steps", "4", "--samples", "13",
          "--no-progress"]  # fmt: skip
RUNS = {"float64": ["--hvp-dtype", "float64", *FEW], "float32": ["--hvp-dtype", "float32", *FEW], "blocks": BLOCKS}


def run_all(run: str, out: str) -> int:
    """The commands of :data:`RUNS` (module docstring); the first non-zero exit code, else 0."""
    from landscape import curvature
    from tests.nodraw import figures_not_drawn

    with figures_not_drawn():
        for folder, options in RUNS.items():
            code = curvature.main(["--run", run, "--out", os.path.join(out, folder), *options])
            if code:
                return code
    return 0


def main(argv: list[str]) -> int:
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    try:
        return run_all(*argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
