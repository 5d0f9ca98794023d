"""The run configuration's checks: every value's range, choice and combination, checked once before any work.

:class:`ConfigChecks` is the half of :class:`landscape.config.RunConfig` that validates: each failure is a
:class:`UserError` naming the setting as the user gave it (``--batch-size 0``, ``FILE [train] batch_size = 0``)
and the fix. The names of the solutions and of the random charts live here, below the configuration that
imports them.
"""

from __future__ import annotations

import math
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from adapters import compat
from adapters.errors import UserError
from landscape.cli import out_folder_problem

SOLUTION_NAMES = ("ft", "lora", "randlora")
LR_METHODS = ("ft", "lora", "randlora", "head_only")
RANDOM_CHARTS = ("random", "random-line")  # landscape.engine.plane.RANDOM_CHARTS (tested equal)
RANDOM_OPTIONS = ("center", "direction_seed", "direction_norm", "ignore", "coordinates", "draws")
HESSIAN_OPTIONS = ("center", "coordinates")  # --chart hessian (landscape.engine.hessian_chart): a centre, coordinates
# --launcher's settings (landscape.launch); "launcher" first. Also the stage keys' "run" group (landscape.stages)
LAUNCH_OPTIONS = ("launcher", "wait", "shards", "partition", "gpus_per_task", "time_limit", "array_parallelism",
                  "slurm")  # fmt: skip

# sbatch options with a setting of their own: not through the passthrough ([cluster] slurm)
SLURM_OWN = {"partition": "partition", "time": "time_limit", "gpus_per_task": "gpus_per_task",
             "array": "array_parallelism", "gres": "gpus_per_task"}  # fmt: skip

_Config = TypeVar("_Config", bound="ConfigChecks")  # validate() returns the RunConfig it checked


class ConfigChecks:
    """Validation of a :class:`landscape.config.RunConfig` (a mixin: the fields live on the dataclass)."""

    def where(self, name: str) -> str:
        """How the user set ``name``: '--batch-size', 'FILE [train] batch_size', 'preset quick' or 'default'."""
        return self.sources.get(name, "default")

    def _shown(self, name: str) -> str:
        """The setting as the user gave it: '--batch-size 0' or "FILE [train] batch_size = 0"."""
        where, value = self.where(name), getattr(self, name)
        if not where.startswith("--"):
            return f"{where} = {value!r}"
        if value is True:  # a flag
            return where
        return f"{where} {' '.join(map(str, value)) if isinstance(value, list | tuple) else value}"

    def _fail(self, name: str, problem: str, fix: str) -> None:
        raise UserError(f"{self._shown(name)}: {problem}: {fix}")

    def validate(self: _Config) -> _Config:
        """Check every value (ranges, choices, combinations); a UserError names the first bad one."""
        from adapters.data import dataset_names

        if self.dataset not in dataset_names():
            raise UserError(f"unknown dataset '{self.dataset}': choose one of {', '.join(dataset_names())}")
        for f in fields(self):
            choices = f.metadata.get("cli", {}).get("choices") if f.metadata else None
            if choices and f.name != "preset" and getattr(self, f.name) not in (*choices, None):
                self._fail(f.name, "not a valid choice", f"use one of {', '.join(choices)}")
        at_least = {
            "batch_size": 1, "grad_accum": 1, "grid": 2, "eval_batch": 1, "eval_samples": 0, "seed": 0,
            "train_steps": 1, "randlora_rank": 1, "lora_rank": 1, "train_per_class": 1, "test_per_class": 1,
            "threads": 1, "cutoff_len": 8, "direction_seed": 0, "eval_tokens": 1, "draws": 1,
        }  # fmt: skip
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                why = "is too small: a surface needs at least 2 points per axis" if name == "grid" else ""
                self._fail(name, why or f"must be an integer >= {low}", f"pass a value >= {low}")
        for name, low, strict in (("epochs", 0, True), ("weight_decay", 0, False), ("grad_clip", 0, True),
                                  ("path_extend", 0, False), ("randlora_alpha", 0, True),
                                  ("randlora_dropout", 0, False)):  # fmt: skip
            value = getattr(self, name)
            if value is not None and not _number_above(value, low, strict):
                self._fail(name, f"must be a finite number {'>' if strict else '>='} {low}", "fix the value")
        if self.randlora_dropout >= 1:
            self._fail("randlora_dropout", "must be below 1", "pass e.g. 0.05")
        if self.batch_size % self.grad_accum:
            self._fail("grad_accum", f"does not divide the batch size {self.batch_size}", "pass a divisor")
        if self.path_points != 0 and (not isinstance(self.path_points, int) or self.path_points < 2):
            self._fail("path_points", "a path needs at least 2 points (0 and 1)", "pass 0 (no paths) or >= 2, e.g. 11")
        if self.points_per_forward != "auto" and not (
            isinstance(self.points_per_forward, int) and self.points_per_forward >= 1
        ):
            self._fail("points_per_forward", "must be a positive integer or auto", "pass e.g. 1 or auto")
        for key, lr in self.lr.items():
            if key not in LR_METHODS or not _number_above(lr, 0, strict=key != "head_only"):
                self._fail("lr", f"'{key}' must be one of {', '.join(LR_METHODS)} with a finite rate > 0", "fix it")
        for name in ("x_range", "y_range"):
            value = getattr(self, name)
            if value is not None and not (
                len(value) == 2 and all(_number_above(v, -math.inf, True) for v in value) and value[0] < value[1]
            ):
                self._fail(name, "must be [low, high] with low < high", "fix the range")
        if self.targets is not None and not self.targets:
            self._fail("targets", "names no module", "give module-name suffixes, or leave it out for the model's own")
        for name in self.solutions:
            if name not in SOLUTION_NAMES:
                raise UserError(f"--solutions {name}=...: NAME must be one of {', '.join(SOLUTION_NAMES)}")
        self._validate_not_ignored()
        self._validate_seeds()
        self._validate_methods()
        self._validate_packed()
        self._validate_random_chart()
        self._validate_out()
        self._validate_plane_vertices()
        self._validate_launcher()
        return self

    def _validate_not_ignored(self) -> None:
        """Settings that this run would ignore without a word: the causal-LM ones (the commonsense data) on
        another dataset, a --path-extend with no paths."""
        if self.dataset != "commonsense":
            given = [self._shown(k) for k in ("tasks", "generate_eval", "eval_tokens")
                     if self.where(k) != "default" and getattr(self, k) not in (None, False)]  # fmt: skip
            if given:
                raise UserError(f"{', '.join(given)}: applies to causal language models (--dataset commonsense) "
                                f"only, not to {self.dataset}: drop it")  # fmt: skip
        if self.path_points == 0 and self.path_extend:
            self._fail("path_extend", "extends the paths, and --path-points 0 runs none", "drop it or give paths")

    def _validate_launcher(self) -> None:
        """--launcher's settings: ranges, the sbatch passthrough's types, given only with a launcher, not under
        torchrun (the jobs are the processes)."""
        for name, low in (("shards", 1), ("gpus_per_task", 0), ("time_limit", 1), ("array_parallelism", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                self._fail(name, f"must be an integer >= {low}", f"pass a value >= {low}")
        for key, value in self.slurm.items():
            if key in SLURM_OWN or not isinstance(value, str | int | float | bool):
                fix = f"set {SLURM_OWN[key]} instead" if key in SLURM_OWN else "give a string or a number"
                self._fail("slurm", f"'{key}' cannot be passed through", fix)
        if self.launcher is None:
            given = [self._shown(k) for k in LAUNCH_OPTIONS[1:] if self.where(k) != "default"]
            if given:
                raise UserError(f"{', '.join(given)}: cluster settings apply with --launcher local or slurm only: "
                                "drop them or pass --launcher")  # fmt: skip
            return
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            self._fail("launcher", "submits jobs, and this is one process of a torchrun",
                       "run the command in one process (the jobs are the parallel work)")  # fmt: skip

    def _validate_plane_vertices(self) -> None:
        """A plane through the solutions (paper, orthonormal) and the paths between them need LoRA and RandLoRA;
        without FT the base model is their third vertex. A run of FT alone has no plane (it raised KeyError after
        the training), and a random chart's paths failed after its grid."""
        missing = [m for m in ("lora", "randlora") if m not in self.method_set()]
        if not missing:
            return
        have = f"the run has no {' and no '.join(missing)} (solutions: {' '.join(self.method_set())})"
        add = f"add {' '.join(missing)} to --methods or bring {'them' if len(missing) > 1 else 'it'} with --solutions"
        if self.chart not in (*RANDOM_CHARTS, "hessian"):
            raise UserError(f"--chart {self.chart} is the plane through the solutions and needs lora and randlora, "
                            f"but {have}: {add}, or chart one solution with --chart random / hessian --center NAME "
                            "--path-points 0")  # fmt: skip
        if self.path_points != 0:
            where = self.where("path_points")
            shown = f"--path-points {self.path_points}" + ("" if where.startswith("--") else f" ({where})")
            raise UserError(f"{shown}: the paths run between lora, randlora and ft (or the base "
                            f"model), but {have}: {add}, or pass --path-points 0 (no paths)")  # fmt: skip

    def _validate_out(self) -> None:
        """--out is a folder this process can write, or can become one (else every stage's files would fail to
        write after the training)."""
        problem = None if self.out is None else out_folder_problem(self.out)
        if problem:
            self._fail("out", problem, "pass a folder (new or existing) you can write")

    def _validate_seeds(self) -> None:
        """``seeds``: an integer >= 1; above 1 it trains every method of the plane per seed: not solutions given,
        nor a random chart."""
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            self._fail("seeds", "must be an integer >= 1", "pass a value >= 1 (1: the run's own seed only)")
        if self.seeds == 1:
            return
        if self.solutions:
            self._fail("seeds", "trains every method once per seed, and --solutions are trained elsewhere",
                       "drop --solutions or pass --seeds 1")  # fmt: skip
        if self.chart in RANDOM_CHARTS:
            self._fail("seeds", f"applies to the planes through the solutions, not --chart {self.chart}",
                       "pass --chart paper or orthonormal, or --seeds 1")  # fmt: skip

    def _validate_methods(self) -> None:
        """``methods``: a non-empty list of ft / lora / randlora; ft not trained on a 4-bit base (it is packed)."""
        self._validate_fsdp()
        if self.methods is None:
            return
        if not self.methods or any(m not in SOLUTION_NAMES for m in self.methods):
            self._fail("methods", f"must be one or more of {', '.join(SOLUTION_NAMES)}", "fix the list")
        if self.load_4bit and "ft" in self.methods and "ft" not in self.solutions:
            where = self.where("methods")
            shown = f"{where} {' '.join(self.methods)}" if where.startswith("--") else self._shown("methods")
            raise UserError(
                f"{shown} with {self.where('load_4bit')}: full fine-tuning cannot train a packed "
                "4-bit base: drop ft (the default under --load-4bit is lora randlora) or bring an FT model with "
                "--solutions ft=CHECKPOINT"
            )

    def _validate_fsdp(self) -> None:
        """``fsdp`` shards full fine-tuning over torchrun's processes: it needs torchrun, an FT solution to
        train (the adapters of the same run train under DDP, as without it) and no float16 weights (an fp16
        checkpoint loaded with --torch-dtype auto is refused when its dtype is known, before FT trains); on the CPU,
        torch >= 2.9 (:data:`adapters.compat.FSDP_CPU_TORCH`)."""
        if not self.fsdp:
            return
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            self._fail("fsdp", "shards over torchrun's processes, and this is one process",
                       "launch with torchrun --nproc-per-node N (N >= 2), or drop it")  # fmt: skip
        default = ("lora", "randlora") if self.load_4bit else SOLUTION_NAMES
        if "ft" not in set(self.methods or default) - set(self.solutions):
            fix = "train ft (in --methods, not under --load-4bit, not given by --solutions), or drop it"
            self._fail("fsdp", "shards full fine-tuning, and this run trains no FT solution", fix)
        if self.torch_dtype == "float16":  # fp16 needs a loss scaler, which the sharded training has not
            self._fail("torch_dtype", f"cannot train under {self.where('fsdp')} (float16 needs loss scaling, which "
                       "the sharded training does not do)", "pass --torch-dtype bfloat16 or float32")  # fmt: skip
        if self._on_cpu() and not compat.fsdp_runs_on_cpu():
            import torch

            floor = compat.FSDP_CPU_TORCH
            self._fail("fsdp", f"shards CPU tensors from torch {floor} on, and this is torch {torch.__version__} "
                       "(before it, FSDP2 on the CPU fails or trains to other weights than one process)",
                       f"install torch>={floor}, or run on GPUs (--device cuda)")  # fmt: skip

    def _on_cpu(self) -> bool:
        """Whether the run computes on the CPU (``--device cpu``, or ``auto`` with no CUDA device)."""
        import torch

        return self.device == "cpu" or (self.device == "auto" and not torch.cuda.is_available())

    def _validate_packed(self) -> None:
        """A 4-bit base keeps its weights packed: the plane is factored (points applied beside the packed layers)."""
        if self.load_4bit and self.plane_storage == "dense":
            raise UserError(
                f"{self._shown('plane_storage')} with {self.where('load_4bit')}: the dense plane writes W0 + ΔW "
                "into the weights, which a 4-bit base keeps packed: use --plane-storage factored or auto"
            )

    def _validate_random_chart(self) -> None:
        """The random charts' settings: given only with a random chart; an adapter centre for adapter coordinates."""
        random = self.chart in RANDOM_CHARTS
        if self.chart == "hessian":
            self._validate_hessian_chart()
            return
        if not random:
            given = [self._shown(k) for k in RANDOM_OPTIONS if self.where(k) != "default"]
            if given:
                verb = "apply" if len(given) > 1 else "applies"
                raise UserError(f"{', '.join(given)} {verb} to --chart random / random-line only: drop "
                                f"{'them' if len(given) > 1 else 'it'} or pass --chart random")  # fmt: skip
            return
        self._validate_center()
        if self.plane_storage == "factored":
            self._fail("plane_storage", "the random charts hold the dense plane (directions over every weight)",
                       "pass --plane-storage dense or auto")  # fmt: skip

    def _validate_center(self) -> None:
        """A chart around one solution (random, hessian): the centre is a solution this run trains or brings, or
        a solution folder; adapter coordinates need an adapter centre. Checked here, not after the training."""
        if self.center not in SOLUTION_NAMES and not Path(self.center).exists():
            self._fail("center", "is neither ft, lora, randlora nor an existing solution folder",
                       "pass ft, lora, randlora or a folder written by landscape.connectivity")  # fmt: skip
        if self.coordinates == "adapter" and self.center == "ft":
            self._fail("coordinates", "adapter coordinates need an adapter centre, and the centre is ft",
                       "pass --center lora or randlora (or --coordinates weights)")  # fmt: skip
        if self.center in SOLUTION_NAMES and self.center not in self.method_set():
            default = " (the default)" if self.where("center") == "default" else ""
            raise UserError(f"--center {self.center}{default}: is not among the solutions "
                            f"({' '.join(self.method_set())}): add {self.center} to --methods, bring it with "
                            "--solutions, or pick another --center")  # fmt: skip

    def _validate_hessian_chart(self) -> None:
        """--chart hessian: a solution centre (as the random charts), --center / --coordinates only, no 4-bit base."""
        given = [self._shown(k) for k in RANDOM_OPTIONS if k not in HESSIAN_OPTIONS and self.where(k) != "default"]
        if given:
            raise UserError(f"{', '.join(given)}: random-direction settings do not apply to --chart hessian (its axes "
                            "are the centre's top Hessian eigenvectors): drop them or pass --chart random")  # fmt: skip
        self._validate_center()
        if self.load_4bit:
            self._fail("chart", f"with {self.where('load_4bit')}: the Hessian chart holds the dense plane, which a "
                       "4-bit base keeps packed", "drop --load-4bit or pass --chart random")  # fmt: skip
        if self.plane_storage == "factored":
            self._fail("plane_storage", "the hessian chart holds the dense plane", "pass --plane-storage dense or auto")


def _number_above(value: Any, low: float, strict: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return value > low if strict else value >= low
