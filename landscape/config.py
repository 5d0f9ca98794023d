"""The run configuration: one dataclass, built once from preset ← TOML file ← command line, validated once.

Every setting of ``python -m landscape.connectivity`` is a field of :class:`RunConfig`, whose metadata
carries its help text, its command-line flag and its TOML key. :func:`from_argv` layers the sources
(later wins): the field defaults, the preset (``quick``/``full``, or ``paper`` read from
``experiments/paper/<dataset>.toml``) or a ``--config FILE``, then the command line. :meth:`RunConfig.validate`
checks every value before any work starts and names where a bad value came from
(``--batch-size 0``, ``cifar100.toml [train] dtype = "fp8"``). Everything downstream receives the
config, and ``landscape.json`` records it resolved.

``None`` means "the model's default" (model, RandLoRA rank, learning rates, weight decay) or
"derived" (LoRA rank matched to RandLoRA's parameter count; training steps from epochs).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from adapters.compat import tomllib
from adapters.errors import UserError
from landscape.config_checks import LAUNCH_OPTIONS, RANDOM_CHARTS, SOLUTION_NAMES, ConfigChecks

PAPER_DATASETS = ("cifar100", "food101", "ucf101", "commonsense")
PAPER_BY_DEFAULT = ("cifar100", "food101", "ucf101")  # paper-sized by default; commonsense: --preset paper
PAPER_DIR = Path(__file__).resolve().parents[1] / "experiments" / "paper"

PRESETS: dict[str, dict[str, Any]] = {
    # `quick` fits the default run (wordnet + MiniLM) in under 10 minutes on a 2-core CPU with AVX2 only
    # (README: measured stage times); 320 evaluation samples keep the vertex-loss standard error near 0.02.
    "quick": {"grid": 11, "eval_samples": 320, "train_steps": 150, "path_points": 11},
    "full": {"grid": 25, "eval_samples": 2000, "train_steps": 1500, "path_points": 21},
}


def option(default: Any, help: str, flag: str | None = "", toml: str | None = None, **cli: Any) -> Any:
    """A config field: its default, help text, command-line flag ('' = from the name, None = none),
    its TOML key ("section.key", None = not in files) and extra argparse settings."""
    meta = {"help": help, "flag": flag, "toml": toml, "cli": cli}
    if isinstance(default, dict | list):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig(ConfigChecks):
    """Everything that defines a run of landscape.connectivity."""

    # --- data and model
    dataset: str = option("wordnet", "dataset: wordnet, fashion-mnist, cifar100, food101, ucf101, commonsense")
    model: str | None = option(
        None,
        "model: minilm, efficientnet-lite0, ViT-B-32 / clip / any open_clip architecture, tiny-bert, clip-tiny, "
        "or hf:ID_OR_FOLDER for any Hugging Face transformers model (a causal LM for commonsense; an encoder "
        "with mean pooling + a linear head for classification) (default: minilm for text, efficientnet-lite0 "
        "for fashion-mnist, ViT-B-32 for the paper's datasets)",
        toml="model.name",
    )
    targets: list | None = option(
        None, "module-name suffixes the adapters attach to (default: the model's; hf: per architecture family, "
        "e.g. q_proj k_proj v_proj up_proj down_proj for Llama/Qwen2/Mistral)", nargs="+", metavar="NAME",
        toml="adapters.targets",
    )  # fmt: skip
    torch_dtype: str = option(
        "float32", "hf: models: the dtype the weights are stored in (how they multiply is --train-dtype / --dtype: "
        "outside autocast half weights are widened to fp32 where used)", toml="model.torch_dtype",
        choices=("float32", "float16", "bfloat16", "auto"),
    )  # fmt: skip
    load_4bit: bool = option(
        False, "hf: models: load the base in 4 bits (bitsandbytes NF4, CUDA or CPU; QLoRA: the adapters train in "
        "fp32 beside the packed weights, which never change; full fine-tuning is refused)",
        toml="model.load_4bit", action="store_true",
    )  # fmt: skip
    cutoff_len: int = option(256, "hf: models: max tokens per sequence (the paper's cutoff length)",
                             toml="data.cutoff_len")  # fmt: skip
    tasks: list | None = option(
        None, "commonsense: the test tasks (default all eight: boolq piqa social_i_qa hellaswag winogrande "
        "ARC-Challenge ARC-Easy openbookqa)", nargs="+", metavar="TASK", toml="data.tasks",
    )  # fmt: skip
    generate_eval: bool = option(
        False, "causal LMs: also measure the solutions' test accuracy the paper's way (beam-4 generation, "
        "answer extracted by regex); slow", toml="train.generate_eval", action="store_true",
    )  # fmt: skip
    data_root: str | None = option(
        None, "folder holding the dataset files (default: the system install)", metavar="DIR"
    )
    train_per_class: int | None = option(
        None, "training samples per class (default: the dataset's; wordnet 500)", toml="data.train_per_class"
    )
    test_per_class: int | None = option(None, "test samples per class (default: 100)", toml="data.test_per_class")
    pretrained: str | None = option(
        None, "CLIP weights: an open_clip tag (default openai), a checkpoint file, or none", toml="model.pretrained"
    )
    prompt_template: str | None = option(
        None, "CLIP class prompt with {c} for the class (default 'An image of {c}')", toml="model.template"
    )
    paper_temperature: bool = option(
        False,
        "CLIP: scale logits by the raw logit_scale as the paper's code does (default exp(logit_scale))",
        toml="model.paper_temperature",
        action="store_true",
    )
    # --- training
    methods: list | None = option(
        None, "the solutions the run trains (head_only, the baseline, always): any of ft lora randlora (default: "
        "all three; under --load-4bit: lora randlora, since full fine-tuning cannot train a packed base)",
        nargs="+", metavar="METHOD", toml="train.methods",
    )  # fmt: skip
    train_steps: int | None = option(None, "optimizer steps per solution (quick: 150, full: 1500)", toml="train.steps")
    epochs: float | None = option(
        None, "training length in epochs (paper: 6/15/20); --train-steps wins", toml="train.epochs"
    )
    batch_size: int = option(32, "effective training batch size (paper: 128)", toml="train.batch_size")
    grad_accum: int = option(1, "micro-batches per optimizer step", toml="train.grad_accum")
    grad_checkpointing: bool = option(
        False, "recompute activations in the backward (CLIP): less memory", toml="train.grad_checkpointing",
        action="store_true",
    )  # fmt: skip
    fsdp: bool = option(
        False, "under torchrun, shard full fine-tuning with FSDP2 (weights, gradients, AdamW state; the adapters "
        "train under DDP as without it)", toml="train.fsdp", action="store_true",
    )  # fmt: skip
    weight_decay: float | None = option(
        None, "AdamW weight decay (default: the model's, 0.01)", flag=None, toml="train.weight_decay"
    )
    grad_clip: float = option(1.0, "max global gradient norm", flag=None, toml="train.grad_clip")
    augment: bool = option(
        False, "the model's training augmentation (CLIP: crop + flip)", flag=None, toml="train.augment"
    )
    train_dtype: str = option(
        "auto", "training forward precision: float32, bfloat16 autocast, or auto (bfloat16 where the device runs "
        "it natively: CUDA with bf16, CPUs with AVX512-BF16 or AMX; float32 elsewhere)", flag=None,
        toml="train.dtype", choices=("auto", "float32", "bfloat16"),
    )  # fmt: skip
    lr: dict = option({}, "learning rate per method {ft, lora, randlora, head_only} (default: the model's)", flag=None,
                      toml="train.lr")  # fmt: skip
    # --- adapters
    randlora_rank: int | None = option(
        None, "RandLoRA rank r (default: the model's; minilm 8)", toml="adapters.randlora_rank"
    )
    randlora_alpha: float | None = option(
        None, "RandLoRA alpha (scale alpha / r; default 20 r, the authors' advice; the seed and the LLM preset: 2 r)",
        flag=None, toml="adapters.randlora_alpha",
    )  # fmt: skip
    randlora_dropout: float = option(0.0, "RandLoRA dropout (the seed: 0.05)", flag=None,
                                     toml="adapters.randlora_dropout")  # fmt: skip
    projection_prng_key: str = option(
        "seed", "RandLoRA bases' key: seed (= --seed) or seed-formula (the authors' int(exp(seed) * 3.1415 * 1000))",
        flag=None, toml="adapters.projection_prng_key", choices=("seed", "seed-formula"),
    )  # fmt: skip
    lora_rank: int | None = option(
        None, "LoRA rank (default: matched to RandLoRA's trainable parameter count)", toml="adapters.lora_rank"
    )
    solutions: dict = option(
        {}, "reuse solutions trained elsewhere: ft=PATH lora=PATH randlora=PATH (any subset)", nargs="+",
        metavar="NAME=PATH",
    )  # fmt: skip
    # --- landscape
    chart: str = option(
        "paper",
        "plane chart: paper = the RandLoRA paper's affine chart (RandLoRA (0,0), LoRA (1,0), FT (0.5,1)); "
        "orthonormal = Garipov et al., Euclidean units; random = Li et al. 2018, two filter-normalised Gaussian "
        "directions around one solution (--center), axes [-1, 1]; random-line = the 1-D cut along the first; "
        "hessian = the plane of --center's top-2 Hessian eigenvectors (unit-norm, --coordinates)",
        toml="landscape.chart",
        choices=("paper", "orthonormal", "random", "random-line", "hessian"),
    )
    center: str = option(
        "ft", "random charts: the solution at the centre: ft, lora, randlora, or a solution folder PATH",
        toml="landscape.center", metavar="ft|lora|randlora|PATH",
    )  # fmt: skip
    direction_seed: int | None = option(
        None, "random charts: seed of the Gaussian directions (default: --seed)", toml="landscape.direction_seed"
    )
    draws: int = option(
        5, "random charts: independent draws of the directions around the centre (draw 0 is the --direction-seed "
        "one; the others' seeds are derived from it and recorded); every draw's losses are kept",
        toml="landscape.draws", metavar="K",
    )  # fmt: skip
    direction_norm: str = option(
        "filter", "random charts: rescale each direction per filter (row / output channel), per layer (parameter "
        "tensor) or as a whole to the centre's norm (loss-landscapes' names)", toml="landscape.direction_norm",
        choices=("filter", "layer", "model"),
    )  # fmt: skip
    ignore: str = option(
        "biasbn", "random charts: biasbn = biases and norm parameters (every tensor with <= 1 dimension) get no "
        "direction (Li et al.'s --xignore biasbn); none = they move too", toml="landscape.ignore",
        choices=("biasbn", "none"),
    )  # fmt: skip
    coordinates: str = option(
        "weights", "random charts: weights = the directions span every weight of the model; adapter = they span "
        "the centre's adapter parameters (LoRA A/B, RandLoRA lambda/gamma, the head) in its peft model (needs a "
        "lora or randlora centre)", toml="landscape.coordinates", choices=("weights", "adapter"),
    )  # fmt: skip
    grid: int = option(
        11, "grid points per axis; the vertices are grid points (full: 25 = the paper's)", toml="landscape.grid"
    )
    x_range: list | None = option(None, "x window [low, high] (paper chart)", flag=None, toml="landscape.x_range")
    y_range: list | None = option(None, "y window [low, high] (paper chart)", flag=None, toml="landscape.y_range")
    eval_split: str = option(
        "train", "split the landscape is evaluated on (train, as the paper)", toml="landscape.eval_split",
        choices=("train", "test"),
    )  # fmt: skip
    eval_samples: int = option(
        512, "size of the fixed evaluation subset (quick: 320, full: 2000; a --config file without it: 512); "
        "0 = the whole split", toml="landscape.eval_samples",
    )  # fmt: skip
    eval_batch: int = option(128, "evaluation batch size", flag=None, toml="landscape.eval_batch")
    eval_tokens: int | None = option(
        None, "causal LMs: evaluation batch size in padded candidate tokens (default: 8192 on CPU, 65536 on GPU); "
        "changes batching, not the numbers", metavar="N", toml="landscape.eval_tokens",
    )  # fmt: skip
    dtype: str = option(
        "auto",
        "forward precision of the landscape and paths: bfloat16 autocast (loss reduced in fp32) or float32 "
        "(auto: bfloat16 where the device runs it natively: CUDA with bf16, CPUs with AVX512-BF16 or AMX)",
        toml="landscape.dtype",
        choices=("auto", "float32", "bfloat16"),
    )
    points_per_forward: int | str = option(
        "auto",
        "grid points evaluated by one vmapped forward: a number or auto (1 on CPU; on GPU min(16, 1024 // "
        "samples per batch))",
        metavar="P",
    )
    plane_storage: str = option(
        "auto",
        "how the plane holds the solutions: dense (origin + x U + y V per parameter: ~13 fp32 model copies, the "
        "fastest points on small models) or factored (W0 + the FT update + the adapters' factors, weights built per "
        "module as it runs: ~1 extra model copy); auto = dense when it fits in half of the free memory",
        toml="landscape.plane_storage", choices=("auto", "dense", "factored"),
    )  # fmt: skip
    path_points: int = option(11, "values of t on each 1-D path (full: 21; 0 = no paths)", toml="landscape.path_points")
    path_extend: float = option(0.0, "the paths run over t in [-E, 1 + E]", toml="landscape.path_extend")
    curvature: bool = option(
        False, "also measure the curvature at each solution (python -m landscape.curvature with its defaults: "
        "top-5 Hessian eigenvalues, Hutchinson trace, SLQ density, in weight and adapter coordinates) into "
        "curvature.json / .png; about 130 Hessian-vector products per solution and coordinates",
        toml="landscape.curvature", action="store_true",
    )  # fmt: skip
    merges: bool = option(
        False, "also merge the solutions' updates (python -m landscape.merges with its defaults: task arithmetic, "
        "TIES, DARE of every pair at (1/2, 1/2) and the three at (1/3, 1/3, 1/3)), evaluate them on the paths' "
        "samples and place them on the plane: merges.json / .npz / .png / .pdf; 15 evaluations of the set",
        toml="landscape.merges", action="store_true",
    )  # fmt: skip
    layerwise: bool = option(
        False, "also walk every pair of solutions one transformer layer at a time, the rest held at either end "
        "(python -m landscape.layerwise with its defaults: 5 points), and report each layer's chord barrier with its "
        "paired SE on the paths' samples: layerwise.json / .npz / .png / .pdf",
        toml="landscape.layerwise", action="store_true",
    )  # fmt: skip
    basins: bool = option(
        False, "also measure each solution's task-metric basin (python -m landscape.basins with its defaults: 5 "
        "random filter-normalised directions and the top-2 Hessian eigen-directions): the radius at which accuracy "
        "drops by more than 2 paired SEs: basins.json / .npz / .png / .pdf",
        toml="landscape.basins", action="store_true",
    )  # fmt: skip
    blocks: bool = option(
        False, "also measure the curvature per transformer layer (python -m landscape.curvature --blocks with its "
        "defaults): each block's top Hessian eigenvalue, Hutchinson trace with its SE and SLQ density, and the "
        "blocks' Jensen-Shannon distances, in weight and adapter coordinates: blocks.json / .npz / .png / .pdf",
        toml="landscape.blocks", action="store_true",
    )  # fmt: skip
    # --- the run
    seed: int = option(0, "seed for data split, initialisation, batches and bases")
    seeds: int = option(
        1, "training seeds per method: N solutions with the seeds --seed, --seed + 1, ..., which vary the batches, "
        "the adapters' init and RandLoRA's bases (the split, the evaluation samples and the base stay --seed's); "
        "vertex losses, accuracies, orderings and path barriers get a 95-percent t-interval over them; the plane is "
        "--seed's. Each extra seed trains every method again and evaluates its paths", toml="train.seeds",
    )  # fmt: skip
    # --- the cluster (landscape.launch): the run's work as submitit jobs (docs/how-to/cluster.md)
    launcher: str | None = option(
        None, "submit the run's work as submitit jobs: slurm (sbatch), or local (the same jobs as processes of "
        "this machine); the command submits and returns; rerun it (or pass --wait) to gather and resubmit "
        "(default: none, everything in this process)", toml="cluster.launcher", choices=("local", "slurm"),
    )  # fmt: skip
    wait: bool = option(False, "with --launcher: wait for the jobs and gather, resubmitting failed ones",
                        action="store_true")  # fmt: skip
    shards: int | None = option(
        None, "with --launcher: array tasks the grid is split into, each a contiguous chunk of points that loads "
        "the model once (default: one per 64 points)", toml="cluster.shards",
    )  # fmt: skip
    partition: str | None = option(None, "Slurm partition", toml="cluster.partition")
    gpus_per_task: int = option(1, "Slurm: GPUs per task (0: CPU jobs)", toml="cluster.gpus_per_task")
    time_limit: int = option(240, "with --launcher: time limit per job in minutes (a job timed out is "
                             "requeued by submitit and resumes)", toml="cluster.time_limit")  # fmt: skip
    array_parallelism: int = option(64, "Slurm: array tasks running at once", toml="cluster.array_parallelism")
    slurm: dict = option(
        {}, "Slurm: other sbatch options, passed through as submitit's SlurmExecutor additional_parameters (e.g. "
        "account, qos, mem)", flag=None, toml="cluster.slurm",
    )  # fmt: skip
    device: str = option("auto", "device", choices=("auto", "cpu", "cuda"))
    threads: int | None = option(None, "CPU threads (default: the CPUs available to this process)")
    out: str | None = option(None, "output folder (default: runs/<dataset>)", metavar="DIR")
    restart: bool = option(
        False, "discard grid points checkpointed in --out by an earlier run of other settings", action="store_true"
    )
    progress: bool = option(True, "progress bars", flag="--no-progress", action="store_false")
    preset: str | None = option(
        None, "quick (minutes on a laptop CPU), full, or paper (experiments/paper/<dataset>.toml; the default "
        "for cifar100, food101, ucf101; quick otherwise)", choices=("quick", "full", "paper"),
    )  # fmt: skip
    config_file: str | None = option(None, "a TOML experiment config (layout of experiments/paper/*.toml)",
                                     flag="--config", metavar="FILE")  # fmt: skip
    # where each value came from (for error messages); not a setting
    sources: dict = field(default_factory=dict, repr=False, compare=False, metadata={"flag": None, "toml": None})

    # ----------------------------------------------------------------------------- derived values

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"runs/{self.dataset}")

    def steps_for(self, train_samples: int) -> int:
        """Optimizer steps per solution: ``train_steps``, else ``epochs`` (default 1) over the training split."""
        if self.train_steps is not None:
            return self.train_steps
        epochs = self.epochs if self.epochs is not None else 1.0
        return max(1, math.ceil(epochs * train_samples / min(self.batch_size, train_samples)))

    def method_set(self) -> tuple[str, ...]:
        """The solutions of the run, in :data:`SOLUTION_NAMES` order: ``methods`` (default: ft lora randlora; under
        ``load_4bit``: lora randlora), plus any given with ``--solutions``."""
        default = ("lora", "randlora") if self.load_4bit else SOLUTION_NAMES
        chosen = set(self.methods or default) | set(self.solutions)
        return tuple(m for m in SOLUTION_NAMES if m in chosen)

    def eval_tokens_for(self, device_type: str) -> int:
        """The evaluation token budget of causal LMs: ``eval_tokens``, else the device's default."""
        from adapters.models.lm_scoring import default_eval_tokens

        return self.eval_tokens or default_eval_tokens(device_type)

    def landscape_dtype(self, device_type: str) -> str:
        """The landscape's forward dtype on this kind of device (``auto``: :mod:`adapters.precision`)."""
        from adapters.precision import resolve_dtype

        return resolve_dtype(self.dtype, device_type)

    def to_dict(self) -> dict:
        """The resolved settings, as recorded in landscape.json."""
        d = asdict(self)
        d.pop("sources")
        if d["seeds"] == 1:  # one seed, the default: landscape.json stays as it was before --seeds
            d.pop("seeds")
        d["solutions"] = {k: str(v) for k, v in self.solutions.items()}
        if self.chart not in RANDOM_CHARTS:  # --draws applies to the random charts only: the others' record unchanged
            d.pop("draws")
        if self.launcher is None:  # a run in this process: landscape.json stays as it was before --launcher
            for name in LAUNCH_OPTIONS:
                d.pop(name)
        return d


# --------------------------------------------------------------------------------- the sources


def _field_map() -> dict[str, Any]:
    return {f.name: f for f in fields(RunConfig)}


TOML_KEYS = {f.metadata["toml"]: f.name for f in fields(RunConfig) if f.metadata.get("toml")}


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML experiment config as {field: value}; unknown sections/keys and wrong types are errors."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist: pass an existing TOML file to --config") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} is not valid TOML ({e}): fix the file") from None
    sections = sorted({k.split(".")[0] for k in TOML_KEYS})
    values: dict[str, Any] = {}
    for section, table in raw.items():
        if section not in sections or not isinstance(table, dict):
            raise UserError(f"{path}: unknown section [{section}]: use {', '.join(f'[{s}]' for s in sections)}")
        for key, value in table.items():
            name = TOML_KEYS.get(f"{section}.{key}")
            if name is None:
                known = ", ".join(k.split(".")[1] for k in TOML_KEYS if k.startswith(section + "."))
                raise UserError(f"{path}: unknown key '{key}' in [{section}]: use {known}")
            if not _type_ok(_field_map()[name], value):
                raise UserError(f"{path}: [{section}] {key} = {value!r} has the wrong type: fix the file")
            values[name] = value
    return values


def _type_ok(f, value: Any) -> bool:
    kind = str(f.type)
    if "bool" in kind:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if "dict" in kind:
        return isinstance(value, dict)
    if "list" in kind:
        return isinstance(value, list)
    if "float" in kind:
        return isinstance(value, int | float)
    if "int" in kind:
        return isinstance(value, int)
    return isinstance(value, str)


def build_parser(prog: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    """The command line of :class:`RunConfig`: one flag per field (help from the field), no defaults
    filled in (argparse.SUPPRESS), so only what the user typed overrides the preset and the file."""
    from landscape.cli import Parser

    p = Parser(prog=prog, description=description, epilog=epilog, argument_default=argparse.SUPPRESS)
    for f in fields(RunConfig):
        flag = f.metadata.get("flag")
        if flag is None:
            continue
        flag = flag or "--" + f.name.replace("_", "-")
        extra = dict(f.metadata["cli"])
        default = f.default if f.default is not MISSING else None
        shown = default is not None and not isinstance(default, bool)
        help_text = f.metadata["help"] + (f" (default: {default})" if shown else "")
        if "action" not in extra:
            extra.setdefault("type", _cli_type(f))
            if "choices" not in extra:
                extra.setdefault("metavar", {int: "N", float: "X"}.get(extra["type"], f.name.split("_")[-1].upper()))
        p.add_argument(flag, dest=f.name, help=help_text, **extra)
    return p


def _cli_type(f):
    kind = str(f.type)
    if f.name == "points_per_forward":
        from landscape.cli import points_per_forward_arg

        return points_per_forward_arg
    if f.name == "solutions":
        return str
    if "float" in kind:
        return float
    if "int" in kind:
        return int
    return str


def preset_values(dataset: str, preset: str | None, config_file: str | None) -> tuple[str, dict, str]:
    """(preset name, {field: value}, where they came from): ``--config`` wins, then ``--preset``, then the
    dataset's default (paper for the paper's datasets, else quick)."""
    if config_file:
        return "config", read_toml(config_file), str(config_file)
    name = preset or ("paper" if dataset in PAPER_BY_DEFAULT else "quick")
    if name != "paper":
        return name, dict(PRESETS[name]), f"preset {name}"
    file = PAPER_DIR / f"{dataset}.toml"
    if dataset not in PAPER_DATASETS or not file.exists():
        raise UserError(
            f"--preset paper exists for {', '.join(PAPER_DATASETS)}, not '{dataset}': use --preset quick or full"
        )
    return name, read_toml(file), str(file)


EPILOG = (
    "Settings are layered: the defaults, then the preset (or --config FILE), then the flags given here. "
    "Example: python -m landscape.connectivity --dataset wordnet --out runs/wordnet (the offline default; "
    "under 10 minutes on 2 CPU cores)"
)


def from_argv(argv, prog: str = "python -m landscape.connectivity", description: str = "") -> RunConfig:
    """Parse the command line and layer defaults ← preset or TOML file ← command line; validate."""
    given = vars(build_parser(prog, description, EPILOG).parse_args(argv))
    return resolve(given)


def resolve(given: dict[str, Any]) -> RunConfig:
    """A validated :class:`RunConfig` from command-line values ``given`` ({field: value}, only those set)."""
    given = dict(given)
    if "solutions" in given:
        from landscape.cli import parse_named_paths

        given["solutions"] = parse_named_paths(given["solutions"], "--solutions", SOLUTION_NAMES)
    config = RunConfig()
    dataset = given.get("dataset", config.dataset)
    preset, values, origin = preset_values(dataset, given.get("preset"), given.get("config_file"))
    _apply(config, values, lambda name: _toml_where(origin, name) if origin.endswith(".toml") else origin)
    _apply(config, given, lambda name: _flag(name))
    config.preset = preset
    if config.data_root is not None:  # recorded resolved, so the run can be reopened from anywhere
        config.data_root = str(Path(config.data_root).expanduser().resolve())
    if config.center not in SOLUTION_NAMES:  # a solution folder, also recorded resolved
        config.center = str(Path(config.center).expanduser().resolve())
    return config.validate()


def _apply(config: RunConfig, values: dict[str, Any], where) -> None:
    # A layer that sets the training length in steps or epochs replaces both of the layers below.
    if "train_steps" in values or "epochs" in values:
        config.train_steps, config.epochs = None, None
    for name, value in values.items():
        setattr(config, name, value)
        config.sources[name] = where(name)


def _flag(name: str) -> str:
    f = _field_map()[name]
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


def _toml_where(origin: str, name: str) -> str:
    key = _field_map()[name].metadata.get("toml") or name
    section, _, short = key.partition(".")
    return f"{Path(origin).name} [{section}] {short}"


__all__ = ["PAPER_DATASETS", "PRESETS", "RunConfig", "build_parser", "from_argv", "read_toml", "resolve"]
