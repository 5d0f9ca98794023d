"""Saving and loading fine-tuned solutions, and their dense weight updates ΔW.

A solution folder holds:
- ``solution.json``: method, model, classes, rank, seed, trainable count, and a fingerprint
  of the base weights (so a solution is never applied to a different base model);
- ``metrics.json``: test loss / accuracy and training history summary;
- the weights: ``model.safetensors`` (``ft``: every parameter; ``head_only``: the head) or
  peft's adapter format (``adapter_config.json`` + ``adapter_model.safetensors``, for
  ``lora`` / ``randlora``), so ``PeftModel.from_pretrained(base, folder)`` loads them.
  RandLoRA adapters are saved without the random bases (``save_projection: false``: peft
  regenerates them from ``projection_prng_key``) plus a checksum of the bases that loading
  verifies, so a solution is never silently applied with different bases.

``Solution.delta()`` gives ``{parameter name: dense fp32 ΔW}`` relative to the base model
for every parameter the solution changes. Adapter updates come from peft's own
``get_delta_weight`` (never by slicing the stored bases: peft flattens them in a permuted
order, see REFERENCE.md §1).
"""

from __future__ import annotations

import copy
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from adapters.errors import UserError
from adapters.methods import ADAPTERS, METHODS
from adapters.models import HEAD, Classifier, get_model

FORMAT_VERSION = 1
PEFT_PREFIX = "base_model.model."


def fingerprint(model: nn.Module) -> str:
    """sha256 over the names, shapes and bytes of the backbone's parameters (not the head)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if name.startswith(HEAD + "."):
            continue
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(p.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Solution:
    """A trained solution: its metadata, the base model it was trained from, and its weights."""

    path: Path
    info: dict
    metrics: dict
    base: Classifier = field(repr=False)
    _delta: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def method(self) -> str:
        return self.info["method"]

    @property
    def name(self) -> str:
        return self.info.get("name", self.method)

    def delta(self) -> dict[str, torch.Tensor]:
        """{parameter name of the base model: dense fp32 ΔW} for every parameter this solution changes."""
        if self._delta is None:
            self._delta = _compute_delta(self)
        return self._delta

    def model(self) -> Classifier:
        """A fresh copy of the base model with this solution's update applied."""
        model = copy.deepcopy(self.base)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, d in self.delta().items():
                params[name].add_(d.to(params[name].dtype))
        return model


def save_solution(folder: str | Path, trained: nn.Module, info: dict, metrics: dict) -> None:
    """Write a solution folder. ``trained`` is the Classifier (ft, head_only) or the PeftModel."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        _rmtree(tmp)
    tmp.mkdir(parents=True)
    method = info["method"]
    if method == "randlora":
        # peft writes the shared random bases once per adapted layer (~350 MB for MiniLM); we store
        # none and a checksum instead: peft regenerates them from projection_prng_key on load.
        from adapters.methods.randlora import save_compact

        save_compact(trained, tmp)
    elif method in ADAPTERS:
        trained.save_pretrained(tmp)
    else:
        state = {
            name: p.detach().cpu().contiguous()
            for name, p in trained.named_parameters()
            if method == "ft" or name.startswith(HEAD + ".")
        }
        save_file(state, tmp / "model.safetensors")
    (tmp / "solution.json").write_text(json.dumps({"format_version": FORMAT_VERSION, **info}, indent=2) + "\n")
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    # Replace the old folder only once the new one is complete.
    if folder.exists():
        _rmtree(folder)
    tmp.rename(folder)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def read_info(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"solution folder {folder} does not exist: pass a folder written by landscape.connectivity")
    try:
        info = json.loads((folder / "solution.json").read_text())
    except FileNotFoundError:
        raise UserError(f"{folder} has no solution.json: it is not a solution folder written by this tool") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{folder}/solution.json is corrupt ({e.msg}): re-train or re-copy the solution") from None
    if info.get("method") not in METHODS or "model" not in info or "num_classes" not in info:
        raise UserError(f"{folder}/solution.json lacks method/model/num_classes: re-train the solution")
    return info


def load_solution(folder: str | Path, base: Classifier | None = None) -> Solution:
    """Load a solution folder. ``base`` (optional) is a base model already built for it."""
    folder = Path(folder)
    info = read_info(folder)
    if base is None:
        base = build_base(info)
    check_base(folder, info, base)
    metrics_file = folder / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    solution = Solution(path=folder, info=info, metrics=metrics, base=base)
    solution.delta()  # read and validate the weights now, so errors surface at load time
    return solution


def build_base(info: dict) -> Classifier:
    """The base model a solution was trained from (its model, classes and model options).

    Built under the solution's seed, as the main job builds it, so randomly initialised bases
    (``--pretrained none``, tiny test models) are rebuilt identically; the global RNG is left as it was.
    """
    n = int(info["num_classes"])
    classes = info.get("classes") or [f"class {i}" for i in range(n)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(info.get("seed", 0)))
        return get_model(info["model"]).create(classes, info.get("model_options"))


def check_base(folder: Path, info: dict, base: Classifier) -> None:
    expected = info.get("base_fingerprint")
    if base.num_classes != int(info["num_classes"]):
        raise UserError(
            f"solution {folder} has {info['num_classes']} classes but the base model has "
            f"{base.num_classes}: use a solution trained on the same dataset"
        )
    if expected and expected != fingerprint(base):
        raise UserError(
            f"solution {folder} was trained from a different base model ({info['model']}, fingerprint "
            f"{expected}): use solutions trained from the same pretrained weights"
        )


def _compute_delta(solution: Solution) -> dict[str, torch.Tensor]:
    folder, method = solution.path, solution.method
    base_params = dict(solution.base.named_parameters())
    if method in ADAPTERS:
        return _adapter_delta(folder, solution.base, base_params)
    weights = folder / "model.safetensors"
    try:
        state = load_file(weights)
    except FileNotFoundError:
        raise UserError(f"{weights} is missing: re-train or re-copy the solution") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{weights} is corrupt ({e}): re-train or re-copy the solution") from None
    delta = {}
    for name, value in state.items():
        if name not in base_params or base_params[name].shape != value.shape:
            raise UserError(
                f"{weights} holds '{name}' {tuple(value.shape)}, which the base model {solution.info['model']} "
                "lacks: the solution comes from another model"
            )
        d = value.float() - base_params[name].detach().float()
        if not torch.isfinite(d).all():
            raise UserError(f"{weights} has NaN/inf in '{name}': the training diverged; re-train it")
        if d.any():
            delta[name] = d
    return delta


def peft_config_of(folder: Path):
    """The adapter's peft config, with our layers for attention / convolutions registered."""
    from peft import LoraConfig, PeftConfig

    from adapters.methods import layers

    config = PeftConfig.from_pretrained(str(folder))
    if isinstance(config, LoraConfig):
        layers.register_lora(config)
    layers.install()
    return config


def _adapter_delta(folder: Path, base: Classifier, base_params: dict) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    if not (folder / "adapter_config.json").exists():
        raise UserError(f"{folder} has no adapter_config.json: the adapter weights are missing; re-train it")
    try:
        with warnings.catch_warnings():  # "bases regenerated from the PRNG key": we verify them below
            warnings.filterwarnings("ignore", message=".*save_projection.*")
            peft_model = PeftModel.from_pretrained(copy.deepcopy(base), folder, config=peft_config_of(folder))
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot load the adapter in {folder} onto {type(base).__name__} ({first_line[:200]}): the files are "
            "corrupt or come from another base model"
        ) from None
    from adapters.methods.randlora import BASES_FILE, verify_bases

    if (folder / BASES_FILE).exists():
        try:
            verify_bases(peft_model, folder)
        except ValueError as e:
            raise UserError(f"{folder}: {e}") from None
    delta = {}
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            short = name.removeprefix(PEFT_PREFIX)
            if isinstance(module, ModulesToSaveWrapper):
                trained = module.modules_to_save["default"]
                for pname, p in trained.named_parameters():
                    key = f"{short}.{pname}"
                    delta[key] = p.detach().float() - base_params[key].detach().float()
            elif isinstance(module, BaseTunerLayer) and hasattr(module, "get_delta_weight"):
                key = f"{short}.{getattr(module, 'adapted_weight', 'weight')}"
                d = module.get_delta_weight("default").detach().float()
                if d.shape != base_params[key].shape:
                    d = d.reshape(base_params[key].shape)
                delta[key] = d
    for key, d in delta.items():
        if not torch.isfinite(d).all():
            raise UserError(f"the adapter in {folder} has NaN/inf in '{key}': training diverged; re-train it")
    return {k: d for k, d in delta.items() if d.any()}
