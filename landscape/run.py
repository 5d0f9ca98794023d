"""The pieces every recipe is made of: load a run's task, train its solutions, build its evaluation set,
and reopen a finished run folder.

A run is a :class:`landscape.config.RunConfig`. :func:`load` builds what it trains and evaluates
(dataset, model, base weights, encoded splits, objective) and loads the solutions given with
``--solutions``; :func:`train_solutions` trains the missing ones (reusing or resuming finished
work); :func:`eval_set` builds the fixed evaluation set the plane, the paths and every later
analysis share. :func:`open_run` rebuilds all of it from a run folder's ``landscape.json``, so
``landscape.paths --run`` and ``landscape.spectrum --run`` see exactly what the run saw.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adapters import distributed
from adapters.data import eval_subset, load_dataset
from adapters.errors import UserError
from adapters.io import digest, key_digest
from adapters.methods import MethodSpec, adapted_weights, match_lora_rank, seed_prng_key
from adapters.methods.budget import lora_params, randlora_params
from adapters.models import DEFAULT_MODEL, build_base, clip, get_model, is_clip, is_hf
from adapters.models.base import HEAD
from adapters.objectives import objective_for
from adapters.precision import resolve_dtype
from adapters.quant import base_quantization
from adapters.solution import Solution, check_method, fingerprint, load_solution, read_info
from adapters.train import Task, TrainConfig, train_solution
from landscape.config import SOLUTION_NAMES, RunConfig
from landscape.engine.grid import EvalSet

METHOD_ORDER = ("head_only", "ft", "lora", "randlora")


@dataclass
class Loaded:
    """A run's task and what was decided while loading it."""

    config: RunConfig
    task: Task
    model_name: str
    model_options: dict
    base_fingerprint: str
    ranks: dict[str, int]  # lora / randlora
    solutions: dict[str, Solution]  # the ones given with --solutions

    @functools.cached_property
    def examples(self) -> dict[str, str]:
        """Digests of the encoded training and test examples (their text or pixels as the model reads them: the
        tokenizer and ``--cutoff-len`` included): a file edited in place must not meet an old solution."""
        from landscape.stages import encoded_digest

        return {"train": encoded_digest(self.task.train), "test": encoded_digest(self.task.test)}

    @property
    def sizes(self) -> dict:
        return {k: v for k in ("train_per_class", "test_per_class") if (v := getattr(self.config, k)) is not None}


def modality(config: RunConfig) -> str:
    from adapters.data import DATASETS

    return DATASETS[config.dataset].modality


def model_name(config: RunConfig) -> str:
    if config.model:
        return config.model
    if modality(config) == "lm":
        raise UserError(
            f"--dataset {config.dataset} needs a causal language model: pass --model hf:ID_OR_FOLDER "
            "(e.g. hf:Qwen/Qwen2-0.5B-Instruct, as in the RandLoRA paper)"
        )
    return DEFAULT_MODEL[modality(config)]


HF_OPTIONS = ("torch_dtype", "load_4bit", "cutoff_len")


def hf_options(config: RunConfig, name: str) -> dict:
    """The build options of an hf: model; for the other models, an error if the user set any of them."""
    if is_hf(name):
        return {k: getattr(config, k) for k in HF_OPTIONS}
    given = [config.where(k) for k in HF_OPTIONS if config.where(k) != "default"]
    if given:
        raise UserError(f"{', '.join(given)} apply to hf: models only, not '{name}': drop them")
    return {}


def model_options(config: RunConfig, entry) -> dict:
    """CLIP's build options (pretrained weights, prompt, temperature), hf: models' (dtype, 4-bit, cutoff);
    none for the other models."""
    if is_hf(entry.name):
        return hf_options(config, entry.name)
    hf_options(config, entry.name)
    if not is_clip(entry):
        flags = [config.where(k) for k in ("pretrained", "prompt_template") if getattr(config, k) is not None]
        flags += [config.where("paper_temperature")] if config.paper_temperature else []
        if flags:
            raise UserError(f"{', '.join(flags)} apply to CLIP models only, not '{entry.name}': drop them")
        return {}
    return {
        "pretrained": config.pretrained or entry.defaults.get("pretrained", "openai"),
        "template": config.prompt_template or clip.TEMPLATE,
        "paper_temperature": bool(config.paper_temperature),
    }


def check_given(config: RunConfig, name: str) -> None:
    """The solutions given with --solutions are of the method, model and dataset they are given for.

    A solution trained elsewhere (:mod:`adapters.foreign`: a peft adapter folder, a full checkpoint) is checked
    for what its files say: readable, and of a kind that can be the method it is given for (a full checkpoint
    only ``ft=``; an adapter ``lora=`` / ``randlora=``, a LoRA not as randlora= nor a RandLoRA as lora=).
    That it fits the base (module names, shapes, NaN/inf) is checked when it is loaded onto the base, before
    any training."""
    from adapters import foreign

    for method, path in config.solutions.items():
        if foreign.is_foreign(path):
            foreign.check_slot(path, foreign.describe(path, method), method)
            continue
        info = read_info(path)
        check_method(Path(path), info, method)
        if info["model"] != name or info.get("dataset", config.dataset) != config.dataset:
            raise UserError(
                f"--solutions {method}={path} was trained with {info['model']} on {info.get('dataset')}, "
                f"not {name} on {config.dataset}: pass matching solutions"
            )


def linear_names(model: nn.Module, most: int = 8) -> list[str]:
    """The distinct last name parts of ``model``'s Linear and Conv2d modules but its head (at most ``most``)."""
    layers = (n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d) and not n.startswith(HEAD))
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in layers))[:most]


def load(config: RunConfig, announce: bool = True) -> Loaded:
    """Dataset, model and base weights of a run; every missing input is named in one line. ``announce``: print
    the adapter budget (and the 4-bit method set) on stderr, as a run that trains does."""
    name = model_name(config)
    check_given(config, name)  # cheap file reads first: a wrong folder fails before any loading
    if config.load_4bit:  # bitsandbytes quantises the weights as they land on the run's device
        from adapters.models import hf

        hf.set_4bit_device("cpu" if config.device == "cpu" else None)
    entry = get_model(name, modality(config), hf_options(config, name))
    if config.targets:
        entry = dataclasses.replace(entry, targets=tuple(config.targets))
    options = model_options(config, entry)
    sizes = {k: v for k in ("train_per_class", "test_per_class") if (v := getattr(config, k)) is not None}
    problems, dataset = [], None
    try:
        data_options = {**sizes, **({"tasks": config.tasks} if config.tasks else {})}
        dataset = load_dataset(config.dataset, data_root=config.data_root, seed=config.seed, **data_options)
    except UserError as e:
        problems.append(str(e))
    if is_clip(entry):  # data and weights are checked together, so one line names all that is missing
        try:
            clip.resolve_pretrained(entry.name, options.get("pretrained"))
        except UserError as e:
            problems.append(str(e))
    if problems:
        raise UserError("; and ".join(problems))
    if entry.modality != dataset.modality:
        raise UserError(
            f"model '{name}' takes {entry.modality} but dataset '{config.dataset}' is {dataset.modality}: "
            f"pick a {dataset.modality} model"
        )
    base = build_base(name, dataset.classes, options, config.seed, modality=dataset.modality)
    task = Task(dataset, entry, base, entry.encode(dataset.train.inputs), entry.encode(dataset.test.inputs),
                objective_for(dataset))  # fmt: skip
    shapes = list(adapted_weights(base, entry.targets).values())
    if not shapes:
        raise UserError(
            f"--targets {' '.join(entry.targets)}: matches no adaptable weight of {name} (its Linear "
            f"layers include {', '.join(linear_names(base))}): pass module-name suffixes from these"
        )
    randlora_rank = config.randlora_rank or entry.defaults.get("randlora_rank", 8)
    lora_rank = config.lora_rank or match_lora_rank(shapes, randlora_rank)
    loaded = Loaded(config, task, name, options, fingerprint(base), {"lora": lora_rank, "randlora": randlora_rank}, {})
    loaded.solutions = {m: load_solution(p, base, m, name) for m, p in config.solutions.items()}  # also foreign
    if announce and distributed.is_lead():
        head = sum(p.numel() for p in base.task_head.parameters()) if hasattr(base, "task_head") else 0
        print(
            f"budget: RandLoRA r={randlora_rank}: {randlora_params(shapes, randlora_rank):,} adapter parameters; "
            f"LoRA r={lora_rank}{'' if config.lora_rank else ' (matched)'}: {lora_params(shapes, lora_rank):,} "
            f"({len(shapes)} adapted weights" + (f"; each also trains the {head:,}-parameter head)" if head else ")"),
            file=sys.stderr,
        )
        if config.load_4bit and "ft" not in config.method_set():
            print(f"methods: {' '.join(config.method_set())} (--load-4bit: full fine-tuning cannot train a packed "
                  "base; bring one with --solutions ft=CHECKPOINT)", file=sys.stderr)  # fmt: skip
    return loaded


def train_config(loaded: Loaded, method: str, device: torch.device, seed: int | None = None) -> TrainConfig:
    """How ``method`` trains; ``seed``: the training seed (batches, augmentation; default ``--seed``)."""
    config, entry = loaded.config, loaded.task.entry
    return TrainConfig(
        steps=config.steps_for(len(loaded.task.dataset.train)),
        batch_size=config.batch_size,
        lr={**entry.defaults["lr"], **config.lr}[method],
        head_lr=entry.defaults.get("head_lr", 3e-3),
        weight_decay=config.weight_decay
        if config.weight_decay is not None
        else entry.defaults.get("weight_decay", 0.01),
        grad_clip=config.grad_clip,
        seed=config.seed if seed is None else seed,
        eval_batch_size=config.eval_batch,
        grad_accum=config.grad_accum,
        autocast=train_autocast(loaded, device),
        augment=config.augment and entry.augment is not None,
        grad_checkpointing=config.grad_checkpointing,
        generate_eval=config.generate_eval,
        eval_tokens=config.eval_tokens_for(device.type),
    )


def train_autocast(loaded: Loaded, device: torch.device) -> str:
    """The training forward's autocast: ``train_dtype`` resolved on the device (``auto``: bf16 where the device
    runs it natively, :mod:`adapters.precision`), to the storage dtype of a model stored in half precision (an
    fp16 model under fp16 autocast); ``"none"`` otherwise, where a half-precision model widens its weights to fp32
    as it uses them (:mod:`adapters.upcast`: the trainable ones train as fp32 masters either way,
    :func:`adapters.train.fp32_masters`)."""
    if resolve_dtype(loaded.config.train_dtype, device) != "bfloat16":
        return "none"
    options = loaded.model_options or {}
    # a 4-bit base: prepare_model_for_kbit_training already made every unpacked weight fp32 (the QLoRA recipe)
    stored = None if options.get("load_4bit") else options.get("torch_dtype")
    if stored == "auto":  # the checkpoint's own dtype: read it off the loaded weights
        dtype = next((p.dtype for p in loaded.task.base.parameters() if p.is_floating_point()), torch.float32)
        stored = str(dtype).removeprefix("torch.")
    return stored if stored in ("bfloat16", "float16") else "bfloat16"


def train_key(loaded: Loaded, method: str, device: torch.device, seed: int | None = None) -> dict:
    """Everything that changes a trained solution: a finished folder is reused, and a checkpoint resumed,
    only under the same key. ``seed``: the training seed (default ``--seed``; the split and base stay its)."""
    config, dataset = loaded.config, loaded.task.dataset
    seed = config.seed if seed is None else seed
    return {
        "dataset": config.dataset,
        "model": loaded.model_name,
        "method": method,
        "rank": loaded.ranks.get(method),
        "seed": seed,
        "train_config": train_config(loaded, method, device, seed).to_dict(),
        "base_fingerprint": loaded.base_fingerprint,
        "data_root": config.data_root,
        "data_source": dataset.source,
        "train_labels": digest([("labels", dataset.train.labels)]),
        "examples": loaded.examples,
        "sizes": loaded.sizes,
        **({"tasks": list(config.tasks)} if config.tasks else {}),
        "model_options": loaded.model_options,
        **({"quantization": base_quantization(loaded.task.base)} if loaded.model_options.get("load_4bit") else {}),
        "targets": list(loaded.task.entry.targets),
        **({"randlora": randlora_settings(config, seed)} if method == "randlora" else {}),
    }


def randlora_settings(config: RunConfig, seed: int | None = None) -> dict:
    """RandLoRA's alpha, dropout and bases' key (None alpha: the method's default, 20 r): the configured
    ``projection_prng_key`` rule applied to ``seed`` (default ``--seed``)."""
    seed = config.seed if seed is None else seed
    key = seed_prng_key(seed) if config.projection_prng_key == "seed-formula" else seed
    return {"alpha": config.randlora_alpha, "dropout": config.randlora_dropout, "prng_key": key}


def method_spec(loaded: Loaded, method: str, seed: int | None = None) -> MethodSpec:
    """The adapter of ``method`` (init and RandLoRA's bases from ``seed``, default ``--seed``)."""
    config = loaded.config
    seed = config.seed if seed is None else seed
    extra = randlora_settings(config, seed) if method == "randlora" else {}
    return MethodSpec(method, rank=loaded.ranks.get(method), seed=seed, **extra)


def solution_keys(loaded: Loaded, device: torch.device) -> dict[str, str]:
    """Per solution of the plane: the digest of its training key, or of its ΔW when given with --solutions."""
    from adapters.solution import delta_fingerprint

    return {
        s: delta_fingerprint(loaded.solutions[s]) if s in loaded.solutions else key_digest(train_key(loaded, s, device))
        for s in loaded.config.method_set()
    }


def training_seeds(config: RunConfig) -> list[int]:
    """The training seeds of a run: ``--seed``, ``--seed`` + 1, ..., ``--seeds`` of them."""
    return [config.seed + k for k in range(config.seeds)]


def seed_folder(out_dir: str | Path, method: str, seed: int, run_seed: int) -> Path:
    """Where the solution of ``method`` trained with ``seed`` lives: ``solutions/METHOD`` for the run's own seed,
    ``solutions/seed-K/METHOD`` for an extra seed K of ``--seeds``."""
    root = Path(out_dir) / "solutions"
    return root / method if seed == run_seed else root / f"seed-{seed}" / method


def train_stage_name(method: str, seed: int, run_seed: int) -> str:
    """The stage (and stages.json record) of a training: ``train_ft``, or ``train_ft_seed1`` for an extra seed."""
    return f"train_{method}" if seed == run_seed else f"train_{method}_seed{seed}"


def trained_methods(config: RunConfig, seed: int) -> list[str]:
    """The methods the run trains with ``seed``: the baseline (the run's own seed only) and ``method_set()``,
    less the solutions given with ``--solutions``."""
    chosen = [m for m in METHOD_ORDER if m in config.method_set() or (m == "head_only" and seed == config.seed)]
    return [m for m in chosen if not (seed == config.seed and m in config.solutions)]


def train_solutions(loaded: Loaded, device: torch.device, stages, seed: int | None = None,
                    methods: tuple[str, ...] | None = None, train: bool = True) -> dict[str, Solution]:  # fmt: skip
    """Every solution of the run (the baseline and ``config.method_set()``): given, reused from the output folder
    (same training key), or trained. ``seed``: an extra training seed of ``--seeds`` (its methods only, no
    baseline, in :func:`seed_folder`); default the run's own. ``methods``: only these (a launcher's training
    job); ``train=False``: a solution not trained yet is an error (a launcher's grid shard, landscape.launch)."""
    run_seed = loaded.config.seed
    seed = run_seed if seed is None else seed
    solutions = dict(loaded.solutions) if seed == run_seed else {}
    for method in trained_methods(loaded.config, seed):
        if methods is not None and method not in methods:
            continue
        folder = seed_folder(loaded.config.out_dir, method, seed, run_seed)
        key = train_key(loaded, method, device, seed)
        if _reusable(folder, key):
            if distributed.is_lead():
                print(f"[train {method}] reusing {folder}", file=sys.stderr)
        elif not train:
            raise UserError(f"{folder} is not trained with this run's settings yet: rerun the launcher's command, "
                            "which trains it first")  # fmt: skip
        else:
            with stages(train_stage_name(method, seed, run_seed)):
                spec = method_spec(loaded, method, seed)
                config = train_config(loaded, method, device, seed)
                fsdp = loaded.config.fsdp and method == "ft"  # FSDP2 shards full fine-tuning only
                train_solution(loaded.task, spec, config, key, folder, device, loaded.config.progress, fsdp=fsdp)
        distributed.wait_for_all()  # the other ranks wait for rank 0's saved solution
        solutions[method] = load_solution(folder, base=loaded.task.base, expect_method=method)
    return solutions


def _reusable(folder: Path, key: dict) -> bool:
    try:
        return read_info(folder).get("train_key") == json.loads(json.dumps(key))
    except UserError:
        return False


def eval_set(loaded: Loaded, device: torch.device | str) -> EvalSet:
    """The fixed evaluation set of the landscape, the paths and every analysis of the run."""
    config, task = loaded.config, loaded.task
    split = task.dataset.train if config.eval_split == "train" else task.dataset.test
    subset = eval_subset(split, config.eval_samples or None, config.seed)
    tokens = config.eval_tokens_for(torch.device(device).type)
    return EvalSet.prepare(task.entry.encode(subset.inputs), subset.labels, config.eval_batch, device, tokens)


def eval_set_with(ctx: OpenRun, device: torch.device | str, samples: int | None) -> EvalSet:
    """A reopened run's evaluation set, or, with ``samples``, its first ``samples`` of the same seeded permutation
    (a command's ``--samples``: reopen with ``with_eval_set=False`` then, so the whole set is never built)."""
    if samples is None:
        return ctx.eval_set
    config = dataclasses.replace(ctx.loaded.config, eval_samples=samples)
    return eval_set(dataclasses.replace(ctx.loaded, config=config), device)


# ------------------------------------------------------------------------------- a finished run


@dataclass
class OpenRun:
    """A run folder reopened: its metadata, config, task, solutions and evaluation set."""

    run_dir: Path
    meta: dict
    loaded: Loaded
    solutions: dict[str, Solution]
    eval_set: EvalSet

    @property
    def base(self) -> torch.nn.Module:
        return self.loaded.task.base


def read_meta(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist: pass a folder written by landscape.connectivity")
    path = run_dir / "landscape.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(
            f"{run_dir} has no landscape.json: run python -m landscape.connectivity --out {run_dir}"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({e}): rerun python -m landscape.connectivity") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise UserError(f"{path} was not written by this version of landscape.connectivity: rerun it")
    return meta


def solution_folders(run_dir: str | Path, meta: dict) -> dict[str, Path]:
    """The folders of a run's ft/lora/randlora solutions: its own, or those it was given (--solutions)."""
    run_dir = Path(run_dir)
    recorded = meta["config"].get("solutions") or {}
    return {s: Path(recorded[s]) if s in recorded else run_dir / "solutions" / s for s in SOLUTION_NAMES}


def seed_solution_folders(run_dir: str | Path, meta: dict) -> dict[int, dict[str, Path]]:
    """The folders of a run's extra training seeds (``--seeds N``): {seed: {method: solutions/seed-K/METHOD}};
    empty for a run of one seed."""
    settings = {k: v for k, v in meta["config"].items() if k in RunConfig.__dataclass_fields__}
    config = RunConfig(**{**settings, "solutions": {}})
    return {seed: {m: seed_folder(run_dir, m, seed, config.seed) for m in config.method_set()}
            for seed in training_seeds(config)[1:]}  # fmt: skip


def open_run_from_args(args, with_eval_set: bool = True) -> tuple[OpenRun, torch.device]:
    """Reopen ``args.run`` as a recipe's command line asks (:func:`landscape.cli.add_run_options`): its CPU threads,
    its device; a missing or foreign run folder is one line before the model loads (:func:`read_meta`)."""
    from adapters import threads
    from landscape.cli import resolve_device

    threads.configure(args.threads)
    device = resolve_device(args.device)
    return open_run(args.run, device, with_eval_set=with_eval_set), device


def open_run(run_dir: str | Path, device: torch.device | str = "cpu", with_eval_set: bool = True) -> OpenRun:
    """Reopen a run: the base model, the three solutions and its evaluation set, rebuilt exactly as the run
    built them from the configuration recorded in landscape.json."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    settings = {k: v for k, v in meta["config"].items() if k in RunConfig.__dataclass_fields__}
    config = RunConfig(**{**settings, "solutions": {}})
    loaded = load(config, announce=False)
    if loaded.base_fingerprint != meta.get("base_fingerprint"):
        raise UserError(
            f"the {loaded.model_name} weights here differ from the run's (fingerprint {meta.get('base_fingerprint')}): "
            "install the same model package version"
        )
    folders = solution_folders(run_dir, meta)
    given = meta["config"].get("solutions") or {}  # the run's method set counts what it was given
    methods = [s for s in SOLUTION_NAMES if s in config.method_set() or s in given]
    solutions = {s: load_solution(folders[s], base=loaded.task.base, expect_method=s) for s in methods}
    evals = eval_set(loaded, device) if with_eval_set else None
    if evals is not None and evals.n != meta.get("eval_samples"):
        raise UserError(
            f"the evaluation set rebuilt from {loaded.task.dataset.source} has {evals.n} samples, not the run's "
            f"{meta.get('eval_samples')}: pass the run's data"
        )
    return OpenRun(run_dir, meta, loaded, solutions, evals)


__all__ = [
    "Loaded",
    "OpenRun",
    "eval_set",
    "load",
    "method_spec",
    "open_run",
    "read_meta",
    "seed_folder",
    "seed_solution_folders",
    "solution_folders",
    "train_config",
    "train_key",
    "train_solutions",
    "training_seeds",
]
