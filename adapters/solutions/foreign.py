"""Solutions trained elsewhere: peft adapters of every type that merges, and full fine-tuned checkpoints.

What a path given as a solution can be (:func:`kind_of`), besides a folder written by this tool:

- a **peft adapter folder** (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``) of any type
  whose layers merge: LoRA (with DoRA, rsLoRA, ``lora_bias``, ``rank_pattern``), RandLoRA, VeRA, LoHa,
  LoKr, AdaLoRA, ... Its ΔW per module is (the module's merged weight) − W0, from that layer's own peft
  ``merge()``, one module at a time (:func:`adapters.deltas.merged_deltas`), so every variant's maths is
  peft's. Method: ``lora`` (peft LORA), ``randlora`` (RANDLORA), else the peft type in lower case
  (``vera``, ``loha``, ``adalora``, ...). Ranks per adapted weight (peft's ``r``, after ``rank_pattern``)
  are recorded in the solution info (``ranks``; ``rank`` = the largest).
- a **full checkpoint** (method ``ft``): a transformers model folder (``config.json`` + ``model.safetensors``,
  sharded ``model-*.safetensors`` with its index, or ``pytorch_model*.bin``), a ``.safetensors`` file, or a
  state-dict file (``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt``, e.g. how the RandLoRA paper's code leaves its
  fine-tuned CLIP models). ΔW = W − W0 per parameter. Safetensors are read per tensor (``safe_open``). A
  state-dict file has no per-tensor index, so there is no lazy read: it is read whole with
  ``torch.load(weights_only=True)`` — never unpickled otherwise — memory-mapped when it is in torch's zip
  format (pages are then read as tensors are used), and held while the solution's deltas live.
  On a 4-bit base (``--load-4bit``) ΔW = W − dequantised W0 (``bitsandbytes.functional.dequantize_4bit``),
  so W0 + ΔW is the fine-tuned model itself (to fp32 rounding): this direction **includes the base's
  quantisation error** (W0's NF4 rounding), which is not part of what fine-tuning changed.

Names. Our models wrap the transformers model (``backbone.`` in :class:`~adapters.models.hf.HFClassifier`
and :class:`~adapters.models.hf.CausalLMScorer`, ``clip.`` in the CLIP classifier), so a name saved from the
plain model lacks that prefix: a name is accepted as it is, under a wrapper's prefix, without peft's
``base_model.model.`` or DDP's ``module.``, and without transformers' ``base_model_prefix`` (``model.`` of
a ``*ForCausalLM`` checkpoint on an ``AutoModel`` base). For adapters this is peft's own ``key_mapping``
(:func:`key_mapping`); it is also set as the base model's ``_checkpoint_conversion_mapping``, which peft
reads when no mapping is passed, so any ``PeftModel.from_pretrained`` onto a copy of that base (the
spectrum's LoRA factors) reads such an adapter too.

Checked before any long work, each failure one line (:class:`~adapters.errors.UserError`): the method the
path is given for must be possible (:func:`check_slot`: a full checkpoint is only ``ft``); every module an
adapter's weights name must exist in the base (the first missing one is named) and every
``modules_to_save`` entry must match a module; the weights peft loaded must be exactly the file's; a
checkpoint's tensors must each match a base parameter (or buffer) of the same shape; NaN/inf is refused.
Nothing is dropped silently: an update that is exactly zero is kept (``delta()`` and ``module_deltas()``
include it), listed in one warning line on stderr and recorded in the info (``zero_updates``).
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from adapters.errors import UserError
from adapters.models.base import HEAD
from adapters.quant import logical_shape
from adapters.solutions.deltas import load_adapter, materialise, merged_deltas, non_finite_message, stored_deltas
from adapters.solutions.peft_config import peft_config_of

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
PEFT_PREFIX = "base_model.model."
SOURCES = ("peft-adapter", "checkpoint")
# peft types that name one of the plane's adapter slots: refused in the other one (as a tool folder is)
SLOT_TYPES = {"lora": ("LORA", "ADALORA"), "randlora": ("RANDLORA",)}
NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module")
ZERO_LISTED = 20  # names in the warning line; the info holds them all


# --------------------------------------------------------------------------- recognising a path


def kind_of(path: str | Path) -> str | None:
    """``"tool"`` (solution.json), ``"peft-adapter"``, ``"checkpoint"``, or None (missing or unrecognised)."""
    path = Path(path)
    if path.is_dir():
        if (path / "solution.json").is_file():
            return "tool"
        if (path / ADAPTER_CONFIG).is_file():
            return "peft-adapter"
        return "checkpoint" if (path / "config.json").is_file() else None
    if path.is_file() and path.suffix in (".safetensors", *STATE_DICT_SUFFIXES):
        return "checkpoint"
    return None


def is_foreign(path: str | Path) -> bool:
    """Whether ``path`` is a solution trained elsewhere (a peft adapter or a full checkpoint)."""
    return kind_of(path) in SOURCES


def describe(path: str | Path, name: str | None = None) -> dict:
    """The solution info of a foreign path from its files alone (no base model, no weights read)."""
    path = Path(path)
    kind = kind_of(path)
    if kind == "checkpoint":
        fmt = "hf-folder" if path.is_dir() else "safetensors" if path.suffix == ".safetensors" else "state-dict"
        return {"name": name or path.stem, "method": "ft", "source": kind, "format": fmt}
    if kind != "peft-adapter":
        raise UserError(f"{path} is neither a solution folder, a peft adapter folder nor a model checkpoint")
    config = _adapter_config(path)
    peft_type = str(config.peft_type.value if hasattr(config.peft_type, "value") else config.peft_type).upper()
    if config.is_prompt_learning or peft_type == "ADAPTION_PROMPT":
        raise UserError(f"{path} is a peft {peft_type} adapter: it changes no weight, so it has no ΔW to analyse")
    variants = [v for v in ("use_dora", "use_rslora", "lora_bias") if getattr(config, v, False) is True]
    return {
        "name": name or path.name,
        "method": {"LORA": "lora", "RANDLORA": "randlora"}.get(peft_type, peft_type.lower()),
        "source": kind,
        "peft_type": peft_type,
        "variants": [v.removeprefix("use_") for v in variants],
        "base_model_name_or_path": config.base_model_name_or_path,
        "rank_pattern": getattr(config, "rank_pattern", None),
    }


def _adapter_config(folder: Path):
    try:
        json.loads((folder / ADAPTER_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{folder}/{ADAPTER_CONFIG} is corrupt ({e}): re-copy the adapter") from None
    try:
        with warnings.catch_warnings():  # peft's notes on the config (e.g. bases regenerated from a seed)
            warnings.simplefilter("ignore")
            return peft_config_of(folder)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{folder}/{ADAPTER_CONFIG} is not a peft config this peft reads ({_first(e)})") from None


def check_slot(path: str | Path, info: dict, expect: str | None) -> None:
    """UserError when a foreign solution cannot be the method it is given for (``lora=<a checkpoint>``)."""
    if expect is None:
        return
    path, what = Path(path), _what(info)
    if expect == "ft":
        if info["source"] != "checkpoint":
            raise UserError(
                f"{path} is {what}, not a full fine-tuning: pass it as lora= or randlora= (ft= takes a "
                "full checkpoint: a model folder, a .safetensors or a state-dict file)"
            )
        return
    if expect not in SLOT_TYPES:
        raise UserError(f"{path} is {what}: it cannot be given as {expect}=")
    if info["source"] == "checkpoint":
        if Path(path).is_file() and (Path(path).parent / "adapter_config.json").is_file():
            raise UserError(f"{path} is the weights file of an adapter: pass its folder, {expect}={Path(path).parent}")
        raise UserError(f"{path} is {what}, not a {expect} adapter: pass ft={path}")
    other = next(s for s in SLOT_TYPES if s != expect)
    if info["peft_type"] in SLOT_TYPES[other]:
        raise UserError(f"{path} is {what}, not {expect}: pass {other}={path}")


def _what(info: dict) -> str:
    if info["source"] == "checkpoint":
        return "a full model checkpoint"
    return f"a peft {info['peft_type']} adapter" + (f" ({', '.join(info['variants'])})" if info["variants"] else "")


def default_model(path: str | Path, info: dict) -> str:
    """The base model of a foreign solution given without one: an adapter's ``base_model_name_or_path``."""
    if info["source"] == "peft-adapter" and info.get("base_model_name_or_path"):
        return "hf:" + str(info["base_model_name_or_path"])
    if info["source"] == "checkpoint":
        raise UserError(
            f"{path} is a full checkpoint: pass --model MODEL, the model it was fine-tuned from "
            "(e.g. --model hf:/path/to/base)"
        )
    raise UserError(
        f"{path} is a bare peft adapter that names no base model: pass --model MODEL (or --base "
        "MODEL_NAME) and, for a classifier, --num-classes N"
    )


def modality_of(model: str) -> str:
    """The modality a base model is built for when no dataset says it: an ``hf:`` causal LM ``lm``, another
    ``hf:`` model ``text``, a registered model its own."""
    from adapters.models import get_model, hf, is_hf

    if is_hf(model):
        return "lm" if hf.is_causal_lm(hf.load_config(hf.resolve(model[len(hf.PREFIX) :]))) else "text"
    return get_model(model).modality


# --------------------------------------------------------------------------- loading


def read(path: str | Path, base: nn.Module, info: dict, model: str | None = None) -> dict:
    """The info of a foreign path's solution on ``base``: fit and NaN/inf checked, ranks and exactly-zero
    updates recorded (module docstring). :func:`adapters.solutions.solution.load_foreign` wraps it in a
    :class:`~adapters.solutions.solution.Solution` (this module stays below the Solution type)."""
    path = Path(path)
    info = {
        **info,
        "model": model or info.get("model") or type(base).__name__,
        "num_classes": getattr(base, "num_classes", None),
    }
    if info["source"] == "peft-adapter":
        deltas, ranks, count = _adapter_deltas(path, base, info["model"])
        info.update(ranks=ranks, rank=max(ranks.values()) if ranks else None, trainable_params=count)
    else:
        deltas = _checkpoint_deltas(path, base, info["model"])
        info["trainable_params"] = sum(d.shape.numel() for d in deltas.values())
    info["zero_updates"] = zeros = _zero_names(deltas)
    if zeros:
        _warn_zero(path, zeros)
    return info


def module_deltas(solution) -> dict:
    """{parameter name of the base: :class:`adapters.deltas.Delta`} of a foreign solution (zero ones included)."""
    path, model = Path(solution.path), solution.info.get("model")
    if solution.info["source"] == "peft-adapter":
        return _adapter_deltas(path, solution.base, model)[0]
    return _checkpoint_deltas(path, solution.base, model)


def checked(deltas: dict) -> dict:
    """``deltas`` unchanged, after a streaming pass that refuses NaN/inf (zero updates are kept)."""
    _zero_names(deltas)
    return deltas


def dense(solution) -> dict[str, torch.Tensor]:
    """Every ΔW of a foreign solution as a dense fp32 tensor, zero ones included; UserError on NaN/inf."""
    return materialise(module_deltas(solution), keep_zero=True)


def _zero_names(deltas: dict) -> list[str]:
    """Names of the all-zero updates, one ΔW in memory at a time; UserError on NaN/inf."""
    zeros = []
    for name, delta in deltas.items():
        d = delta()
        if not torch.isfinite(d).all():
            raise UserError(non_finite_message(delta))
        if not d.any():
            zeros.append(name)
        del d
    return zeros


def _warn_zero(path: Path, zeros: list[str]) -> None:
    from adapters import distributed

    if distributed.is_lead():
        listed = ", ".join(zeros[:ZERO_LISTED]) + (
            f" and {len(zeros) - ZERO_LISTED} more" if len(zeros) > ZERO_LISTED else ""
        )
        print(
            f"warning: {path}: {len(zeros)} update(s) exactly zero, kept as zero (info 'zero_updates'): {listed}",
            file=sys.stderr,
        )


def _first(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


# --------------------------------------------------------------------------- names


def wrappers(base: nn.Module) -> list[str]:
    """The base's direct children that wrap a model (have submodules): ``backbone`` / ``clip``, not the head."""
    return [n for n, m in base.named_children() if next(m.children(), None) is not None]


def key_mapping(base: nn.Module) -> dict[str, str]:
    """peft's ``key_mapping`` (regex → replacement, first match wins) from a plain model's module names to
    ``base``'s: a name starting with a wrapped model's child gains the wrapper's prefix (``model.`` →
    ``backbone.model.``); one starting with its ``base_model_prefix`` that it lacks swaps it (``model.`` →
    ``backbone.`` on an ``AutoModel``). Names already in ``base``'s form start with a top-level name and
    never match."""
    top = {n for n, _ in base.named_children()}
    mapping: dict[str, str] = {}
    for w in wrappers(base):
        inner = getattr(base, w)
        children = [n for n, _ in inner.named_children() if n not in top]
        if children:
            mapping[rf"^(?=(?:{'|'.join(map(re.escape, children))})\.)"] = f"{w}."
        prefix = getattr(inner, "base_model_prefix", None)
        if isinstance(prefix, str) and prefix and prefix not in top and prefix not in children:
            mapping[rf"^{re.escape(prefix)}\."] = f"{w}."
    return mapping


def apply_mapping(name: str, mapping: dict[str, str]) -> str:
    """``name`` renamed by the first pattern of ``mapping`` that matches (peft's rule)."""
    for pattern, replacement in mapping.items():
        renamed, n = re.subn(pattern, replacement, name)
        if n:
            return renamed
    return name


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------- peft adapters


def _adapter_deltas(folder: Path, base: nn.Module, model: str | None) -> tuple[dict, dict[str, int], int]:
    """(deltas, ranks, adapter parameter count) of the adapter in ``folder`` on ``base``."""
    peft_model, count = attach(folder, base, model)
    deltas, ranks = merged_deltas(peft_model, base, str(folder))
    return deltas, ranks, count


def attach(folder: Path, base: nn.Module, model: str | None = None) -> tuple[nn.Module, int]:
    """(peft's model of the adapter on a skeleton of ``base``, the adapter's own parameter count), after the
    checks of the module docstring; the base's ``_checkpoint_conversion_mapping`` is set for later readers."""
    model = model or type(base).__name__
    config = _normalised_config(folder, base)
    shapes = _adapter_shapes(folder)
    mapping = key_mapping(base)
    modules = dict(base.named_modules())
    _check_modules(folder, config, shapes, mapping, modules, model)
    if mapping and not hasattr(base, "_checkpoint_conversion_mapping"):
        base._checkpoint_conversion_mapping = mapping  # peft's default key_mapping for any copy of this base
    peft_model = load_adapter(folder, base, config=config, key_mapping=mapping, quiet=True)
    _check_loaded(folder, peft_model, config, shapes, mapping)
    # The adapter's own parameters (LoRA A/B, RandLoRA λ/γ, DoRA magnitudes, a modules_to_save copy), not the
    # file's tensors: a RandLoRA or VeRA file saved with its projections holds the shared frozen bases once per
    # adapted layer, which are buffers here and train nothing.
    shared = {id(p) for p in base.parameters()}
    count = sum(p.numel() for p in peft_model.parameters() if id(p) not in shared)
    return peft_model, count


def _normalised_config(folder: Path, base: nn.Module):
    """The folder's peft config in ``base``'s names: target / exclude lists without ``base_model.model.``
    (peft matches them as suffixes), AdaLoRA's ``rank_pattern`` (exact module names) renamed."""
    config = _adapter_config(folder)
    for field in ("target_modules", "exclude_modules", "modules_to_save"):
        value = getattr(config, field, None)
        if isinstance(value, list | set | tuple):
            setattr(config, field, type(value)(v.removeprefix(PEFT_PREFIX) for v in value))
    if str(getattr(config.peft_type, "value", config.peft_type)).upper() == "ADALORA" and config.rank_pattern:
        mapping = key_mapping(base)
        config.rank_pattern = {
            apply_mapping(k.removeprefix(PEFT_PREFIX), mapping): v for k, v in config.rank_pattern.items()
        }
    return config


def _adapter_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """{saved name: shape} of the adapter's weights file (the safetensors header; a .bin read as tensors)."""
    weights = next((folder / w for w in ADAPTER_WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise UserError(f"{folder} has no {' or '.join(ADAPTER_WEIGHTS)}: the adapter weights are missing")
    if weights.suffix == ".safetensors":
        return _safetensors_shapes(weights)
    return {k: tuple(v.shape) for k, v in _state_dict(weights).items()}


def _module_of(key: str, prefix: str) -> str:
    """The module a saved adapter weight belongs to: the name before the first part starting with the peft
    type's prefix (``lora_``, ``hada_``, ...); a ``modules_to_save`` copy (``lm_head.weight``): its module."""
    parts = key.removeprefix(PEFT_PREFIX).split(".")
    i = next((j for j, part in enumerate(parts) if prefix and part.startswith(prefix)), len(parts) - 1)
    return ".".join(parts[:i])


def _check_modules(folder: Path, config, shapes: dict, mapping: dict, modules: dict, model: str) -> None:
    """Every module the adapter's weights name exists in the base; every ``modules_to_save`` entry matches one."""
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(config.peft_type) or ""
    named = {_module_of(k, prefix) for k in shapes if k.startswith(PEFT_PREFIX)}
    missing = sorted((m for m in named if apply_mapping(m, mapping) not in modules), key=_natural)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(
            f"the adapter in {folder} adapts '{missing[0]}'{more}, which the base model {model} lacks: "
            "pass the model it was trained from (--model)"
        )
    for entry in getattr(config, "modules_to_save", None) or []:
        if not any(n == entry or n.endswith("." + entry) for n in modules):
            raise UserError(
                f"the adapter in {folder} lists modules_to_save '{entry}', which matches no module of "
                f"the base model {model}: pass the model it was trained from (--model)"
            )


def _check_loaded(folder: Path, peft_model: nn.Module, config, shapes: dict, mapping: dict) -> None:
    """The weights peft holds for the adapter are exactly the file's (peft only warns about the others)."""
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
    from peft.utils import get_peft_model_state_dict

    held = {k for k in get_peft_model_state_dict(peft_model) if k.startswith(PEFT_PREFIX)}
    saved = {
        PEFT_PREFIX + apply_mapping(k.removeprefix(PEFT_PREFIX), mapping): k
        for k in shapes
        if k.startswith(PEFT_PREFIX)
    }
    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(config.peft_type) or ""
    unused = sorted(set(saved) - held, key=_natural)
    if unused:
        raise UserError(
            f"the adapter in {folder} holds weights for '{_module_of(saved[unused[0]], prefix)}', which "
            f"its {ADAPTER_CONFIG} does not adapt: the config and the weights disagree; re-save it"
        )
    lacking = sorted(held - set(saved), key=_natural)
    if lacking:
        raise UserError(
            f"the adapter in {folder} lacks the weight '{lacking[0]}' its {ADAPTER_CONFIG} asks for: "
            "the weights file is incomplete; re-save it"
        )


# --------------------------------------------------------------------------- full checkpoints


def _checkpoint_deltas(path: Path, base: nn.Module, model: str | None) -> dict:
    """Lazy ``W − W0`` per base parameter the checkpoint holds; names and shapes checked now."""
    tensors = checkpoint_tensors(path)
    matched = match_names({n: s for n, (s, _, _) in tensors.items()}, base, path, model or type(base).__name__)
    readers = {p: tensors[n][1] for p, n in matched.items()}
    sources = {p: tensors[n][2] for p, n in matched.items()}
    return stored_deltas(readers, dict(base.named_parameters()), sources)


def checkpoint_tensors(path: Path) -> dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor], str]]:
    """{name: (shape, reader, file)} of a full checkpoint: a model folder, a .safetensors or a state-dict file."""
    files = _checkpoint_files(path) if path.is_dir() else [path]
    out: dict = {}
    for file in files:
        if file.suffix == ".safetensors":
            for name, shape in _safetensors_shapes(file).items():
                out.setdefault(name, (shape, _safetensors_reader(file, name), str(file)))
        else:
            state = _state_dict(file)
            for name, value in state.items():
                out.setdefault(name, (tuple(value.shape), _state_reader(state, name), str(file)))
    if not out:
        raise UserError(f"{path} holds no tensors: pass a model checkpoint")
    return out


def _checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a transformers model folder: safetensors first (sharded through the index), else
    pytorch_model*.bin."""
    for index, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
    ):
        if (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise UserError(f"{folder / index} is corrupt ({_first(e)}): re-copy the model") from None
            files = [folder / f for f in dict.fromkeys(weight_map.values())]
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise UserError(f"{missing[0]} is missing ({index} lists it): re-copy the model")
            return files
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise UserError(
        f"model folder {folder} has config.json but no weights (model.safetensors, sharded "
        "model-*.safetensors or pytorch_model.bin): re-copy the model"
    )


def _safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{file} is corrupt ({e}): re-copy it") from None


def _safetensors_reader(file: Path, name: str) -> Callable[[], torch.Tensor]:
    def read() -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{file} is corrupt ({e}): re-copy it") from None

    return read


def _state_reader(state: dict[str, torch.Tensor], name: str) -> Callable[[], torch.Tensor]:
    return lambda: state[name]


def _state_dict(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file, read with ``torch.load(weights_only=True)`` only (memory-mapped when
    the file is in torch's zip format); one nesting level (``{"state_dict": {...}}``) is unwrapped."""
    import pickle

    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            raise
        except (RuntimeError, OSError, ValueError):  # not torch's zip format: no mmap, read it whole
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"a pickled {found.group(1)}" if found else "pickled objects"
        raise UserError(
            f"{file} cannot be read as tensors only (torch.load weights_only=True refuses it): it holds {what}, "
            "which is never unpickled here; save its state_dict() with torch.save, or a .safetensors file"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise UserError(f"{file} is not a readable torch file ({_first(e)}): re-copy it") from None
    return _tensors_of(state, file)


def _tensors_of(state, file: Path) -> dict[str, torch.Tensor]:
    if isinstance(state, dict):
        nested = [k for k in NESTED_STATE_KEYS if isinstance(state.get(k), dict)]
        if nested and not any(isinstance(v, torch.Tensor) for v in state.values()):
            state = state[nested[0]]
        tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise UserError(f"{file} holds no state dict of tensors ({type(state).__name__}): save model.state_dict()")


def _candidates(name: str, base: nn.Module) -> Iterable[str]:
    """The base names a checkpoint name may stand for (module docstring: prefixes accepted)."""
    forms = [name] + [name[len(p) :] for p in (PEFT_PREFIX, "module.") if name.startswith(p)]
    for form in forms:
        yield form
        for w in wrappers(base):
            yield f"{w}.{form}"
            prefix = getattr(getattr(base, w), "base_model_prefix", None)
            if isinstance(prefix, str) and prefix and form.startswith(prefix + "."):
                yield f"{w}.{form[len(prefix) + 1 :]}"


def match_names(shapes: dict[str, tuple[int, ...]], base: nn.Module, source: Path, model: str) -> dict[str, str]:
    """{base parameter name: checkpoint name}. A name matching a buffer is skipped, a tied alias of a parameter
    counts once; one line for a name that matches nothing or a shape that differs."""
    canonical = {id(p): n for n, p in base.named_parameters()}
    params = dict(base.named_parameters(remove_duplicate=False))
    buffers = {n for n, _ in base.named_buffers(remove_duplicate=False)}
    matched: dict[str, str] = {}
    for name in sorted(shapes, key=_natural):
        found = next((c for c in _candidates(name, base) if c in params or c in buffers), None)
        if found is None:
            raise UserError(
                f"{source} holds '{name}', which matches no parameter of the base model {model} (with "
                "or without its wrapper prefix): pass the model it was fine-tuned from (--model)"
            )
        if found in buffers:
            continue
        param = params[found]
        if tuple(logical_shape(param)) != tuple(shapes[name]):  # a packed 4-bit weight: its (out, in)
            if found.startswith(HEAD + ".") and tuple(param.shape[1:]) == tuple(shapes[name][1:]):
                raise UserError(
                    f"{source} holds a head of {shapes[name][0]} classes ('{name}') but the base model {model} "
                    f"has {param.shape[0]}: pass --num-classes {shapes[name][0]}"
                )
            raise UserError(
                f"{source} holds '{name}' {tuple(shapes[name])} but the base model {model} has "
                f"{tuple(logical_shape(param))}: it was fine-tuned from another model; pass that one (--model)"
            )
        matched.setdefault(canonical[id(param)], name)
    return matched


__all__ = [
    "SOURCES",
    "apply_mapping",
    "attach",
    "check_slot",
    "checked",
    "checkpoint_tensors",
    "default_model",
    "dense",
    "describe",
    "is_foreign",
    "key_mapping",
    "kind_of",
    "match_names",
    "modality_of",
    "read",
    "module_deltas",
    "wrappers",
]
