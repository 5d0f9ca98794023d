"""Run recipes for landscape.connectivity: the built-in presets and TOML experiment configs.

A recipe is a flat dict of settings (model, training, adapters, landscape). Presets:

- ``quick`` / ``full``: the offline experiments (minutes / tens of minutes on 2 CPU cores);
- ``paper``: the RandLoRA paper's CLIP runs, read from ``experiments/paper/<dataset>.toml``
  (cifar100, food101, ucf101), and the default for those datasets.

``--config FILE`` reads any TOML file of the same layout (sections ``[model]``, ``[train]``,
``[adapters]``, ``[landscape]``, ``[data]``); command-line options override what it sets.
"""

from __future__ import annotations

from pathlib import Path

import tomllib

from adapters.errors import UserError

PAPER_DATASETS = ("cifar100", "food101", "ucf101")
PAPER_DIR = Path(__file__).resolve().parents[1] / "experiments" / "paper"

PRESETS: dict[str, dict] = {
    # `quick` fits the default run (wordnet + MiniLM) in under 10 minutes on 2 CPU cores.
    "quick": {"grid": 11, "eval_samples": 512, "train_steps": 200, "path_points": 11},
    "full": {"grid": 25, "eval_samples": 2000, "train_steps": 1500, "path_points": 21},
}

# section -> {key in the file: (key in the recipe, accepted types)}
_NUMBER = (int, float)
SCHEMA: dict[str, dict[str, tuple[str, tuple]]] = {
    "model": {
        "name": ("model", (str,)),
        "pretrained": ("pretrained", (str,)),
        "template": ("template", (str,)),
        "paper_temperature": ("paper_temperature", (bool,)),
    },
    "train": {
        "epochs": ("epochs", _NUMBER),
        "steps": ("train_steps", (int,)),
        "batch_size": ("batch_size", (int,)),
        "grad_accum": ("grad_accum", (int,)),
        "weight_decay": ("weight_decay", _NUMBER),
        "grad_clip": ("grad_clip", _NUMBER),
        "augment": ("augment", (bool,)),
        "dtype": ("train_dtype", (str,)),
        "lr": ("lr", (dict,)),
        "grad_checkpointing": ("grad_checkpointing", (bool,)),
    },
    "adapters": {"lora_rank": ("lora_rank", (int,)), "randlora_rank": ("randlora_rank", (int,))},
    "landscape": {
        "chart": ("chart", (str,)),
        "grid": ("grid", (int,)),
        "x_range": ("x_range", (list,)),
        "y_range": ("y_range", (list,)),
        "eval_split": ("eval_split", (str,)),
        "eval_samples": ("eval_samples", (int,)),
        "eval_batch": ("eval_batch", (int,)),
        "dtype": ("dtype", (str,)),
        "path_points": ("path_points", (int,)),
    },
    "data": {"train_per_class": ("train_per_class", (int,)), "test_per_class": ("test_per_class", (int,))},
}


def read_config(path: str | Path) -> dict:
    """A TOML experiment config as a flat recipe; unknown sections/keys and wrong types are errors."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist: pass an existing TOML file to --config") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML ({e}): fix the file") from None
    recipe: dict = {}
    for section, values in raw.items():
        if section not in SCHEMA or not isinstance(values, dict):
            raise UserError(f"{path}: unknown section [{section}]: use {', '.join(f'[{s}]' for s in SCHEMA)}")
        for key, value in values.items():
            if key not in SCHEMA[section]:
                raise UserError(f"{path}: unknown key '{key}' in [{section}]: use {', '.join(SCHEMA[section])}")
            name, types = SCHEMA[section][key]
            if isinstance(value, bool) and bool not in types or not isinstance(value, types):
                raise UserError(f"{path}: [{section}] {key} = {value!r} has the wrong type: fix the file")
            recipe[name] = value
    for key in ("x_range", "y_range"):
        if key in recipe and (len(recipe[key]) != 2 or not recipe[key][0] < recipe[key][1]):
            raise UserError(f"{path}: {key} must be [low, high] with low < high: fix the file")
    recipe["config_file"] = str(path)
    return recipe


def resolve(dataset: str, preset: str | None, config: str | None) -> tuple[str, dict]:
    """(preset name, recipe) for a run: ``--config`` wins, then ``--preset``, then the dataset's default."""
    if config:
        return "config", read_config(config)
    name = preset or ("paper" if dataset in PAPER_DATASETS else "quick")
    if name != "paper":
        return name, dict(PRESETS[name])
    file = PAPER_DIR / f"{dataset}.toml"
    if dataset not in PAPER_DATASETS or not file.exists():
        raise UserError(
            f"--preset paper exists for {', '.join(PAPER_DATASETS)}, not '{dataset}': use --preset quick or full"
        )
    return name, read_config(file)


__all__ = ["PAPER_DATASETS", "PAPER_DIR", "PRESETS", "read_config", "resolve"]
