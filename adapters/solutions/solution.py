"""Saving and loading fine-tuned solutions, and their dense weight updates ΔW.

A solution folder holds:
- ``solution.json``: method, model, classes, rank, seed, trainable count, a fingerprint
  of the base weights (so a solution is never applied to a different base model), and the sha256 of
  each file beside it (``sha256``; not peft's README.md model card), which loading checks: safetensors
  has no checksum, and a byte flipped on a failing disk or copy would load as a slightly wrong weight;
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
order, see REFERENCE.md §1). ``delta()`` is computed on each call and never kept on the
Solution; loading and :func:`delta_fingerprint` stream over ``module_deltas()`` (one
parameter's ΔW in memory at a time).

Solutions trained elsewhere — a peft adapter folder of any type that merges, or a full
checkpoint (model folder, .safetensors, state dict) — load through :mod:`adapters.foreign`:
:func:`load_solution` and :func:`load_solutions` take them wherever a solution folder is taken.
"""

from __future__ import annotations

import copy
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from adapters.errors import UserError
from adapters.io import atomic_folder, digest, file_sha256
from adapters.methods import ADAPTERS, METHODS
from adapters.models import HEAD, Classifier
from adapters.models import build_base as build_base_model
from adapters.solutions import foreign
from adapters.solutions.deltas import Delta, materialise, non_finite_message, own_deltas
from adapters.solutions.peft_config import PEFT_PREFIX, WRAPPERS, peft_config_of  # noqa: F401 (re-exported)

FORMAT_VERSION = 1
UNSEALED = ("README.md", "solution.json", "metrics.json")  # peft's model card (prose) and the records themselves


def fingerprint(model: nn.Module) -> str:
    """Digest of the names, shapes and bytes of the backbone's parameters (not the head)."""
    return digest((n, p) for n, p in sorted(model.named_parameters()) if not n.startswith(HEAD + "."))


def delta_fingerprint(solution: Solution) -> str:
    """Digest of a solution's ΔW, so results computed from one solution are never reused with another.

    Streams over ``module_deltas()`` in name order, one ΔW in memory at a time (all-zero updates included:
    they change no result but are hashed like any other); a Solution built with explicit updates
    (``_delta``) is hashed from those."""
    if solution._delta is not None:
        return digest(sorted(solution._delta.items()))
    deltas = solution.module_deltas(check=False)
    return digest((name, deltas[name]()) for name in sorted(deltas))


@dataclass
class Solution:
    """A trained solution: its metadata, the base model it was trained from, and its weights.

    ``_delta`` (optional) gives the updates explicitly instead of reading them from ``path`` (tests, in-memory
    solutions); nothing computed is ever stored in it."""

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
        """{parameter name of the base model: dense fp32 ΔW} for every parameter this solution changes, computed
        now and not kept (a foreign solution's exactly-zero updates included: :mod:`adapters.foreign`)."""
        if self._delta is not None:
            return self._delta
        if self.info.get("source") in foreign.SOURCES:
            return foreign.dense(self)
        return materialise(self.module_deltas(check=False))

    def streamed_deltas(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, dense fp32 ΔW)`` pairs with :meth:`delta`'s keys and values, one parameter at a time: each
        ΔW is computed when the iteration reaches it and dropped here before the next (the consumer holds at
        most the one it was given), so no caller ever holds every dense ΔW at once. NaN/inf raises as in
        :meth:`delta`; all-zero updates are left out except for a foreign solution (as :meth:`delta`)."""
        if self._delta is not None:
            yield from self._delta.items()
            return
        keep_zero = self.info.get("source") in foreign.SOURCES
        deltas = foreign.module_deltas(self) if keep_zero else self.module_deltas(check=False)
        for name, delta in deltas.items():
            d = delta()
            if not torch.isfinite(d).all():
                raise UserError(non_finite_message(delta))
            if keep_zero or d.any():
                yield name, d
            del d

    def module_deltas(self, check: bool = True) -> dict[str, Delta]:
        """{parameter name of the base model: a callable returning its dense fp32 ΔW}, the same values as
        :meth:`delta` but computed lazily, one parameter at a time, without a second copy of the model and
        without caching (:mod:`adapters.deltas`; ``check``: refuse NaN/inf now and drop all-zero updates —
        a foreign solution keeps them)."""
        if self._delta is not None:  # explicit updates (the base vertex: none): stored, as given
            return {n: Delta(n, d.shape, "stored", lambda d=d: d.detach().float(), str(self.path))
                    for n, d in self._delta.items() if not check or d.any()}  # fmt: skip
        return module_deltas(self, check)

    def model(self) -> Classifier:
        """A fresh copy of the base model with this solution's update applied (not on a packed 4-bit base: its
        weights cannot take ``W0 + ΔW`` in place)."""
        from adapters.quant import packed_names

        if packed_names(self.base):
            raise UserError(
                f"solution {self.name}: its base is loaded in 4 bits, whose packed weights cannot hold W0 + ΔW: "
                "analyse it in adapter coordinates, or load the base without --load-4bit"
            )
        model = copy.deepcopy(self.base)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, d in self.streamed_deltas():  # one dense ΔW at a time
                params[name].add_(d.to(params[name].dtype))
        return model


def module_deltas(solution: Solution, check: bool = True) -> dict[str, Delta]:
    """{parameter name of the base model: :class:`~adapters.solutions.deltas.Delta`} for every parameter
    ``solution`` changes, read from its source: this tool's folders or a foreign one (``check``: refuse NaN/inf
    now; this tool's solutions also drop all-zero updates, a foreign one keeps them)."""
    if solution.info.get("source") in foreign.SOURCES:  # trained elsewhere: adapters.solutions.foreign
        deltas = foreign.module_deltas(solution)
        return foreign.checked(deltas) if check else deltas
    return own_deltas(solution, check)


def load_foreign(path: str | Path, base: Classifier, info: dict, model: str | None = None) -> Solution:
    """A :class:`Solution` of a foreign path on ``base`` (:func:`adapters.solutions.foreign.read`)."""
    return Solution(path=Path(path), info=foreign.read(path, base, info, model), metrics={}, base=base)


def base_solution(base: Classifier, model: str | None = None) -> Solution:
    """The base model itself as a solution (ΔW = 0): the plane's third vertex when there is no FT solution
    (the default under ``--load-4bit``), named ``"base"``."""
    info = {"method": "base", "name": "base", "model": model, "trainable_params": 0, "adapter_params": 0}
    return Solution(Path(model or "base"), info, {}, base, {})


def save_solution(folder: str | Path, trained: nn.Module, info: dict, metrics: dict) -> None:
    """Write a solution folder atomically. ``trained`` is the Classifier (ft, head_only) or the PeftModel."""
    method = info["method"]
    with atomic_folder(folder) as tmp:
        if method == "randlora":
            # peft would write the shared random bases once per adapted layer (2.8 GB for ViT-B/32); we hand it
            # none and store a checksum instead: peft regenerates them from projection_prng_key on load.
            from adapters.methods.randlora_saving import save_compact

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
        record = {"format_version": FORMAT_VERSION, **info, "sha256": file_record(tmp)}
        (tmp / "solution.json").write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")


def read_info(folder: str | Path) -> dict:
    folder = Path(folder)
    if folder.is_file():
        raise UserError(
            f"{folder} is a file but not a model checkpoint (.safetensors, .pt, .pth, .bin, .ckpt): pass a solution "
            "folder, a peft adapter folder or a model checkpoint"
        )
    if not folder.is_dir():
        raise UserError(f"solution folder {folder} does not exist: pass a folder written by landscape.connectivity")
    try:
        info = json.loads((folder / "solution.json").read_text())
    except FileNotFoundError:
        inside = sorted(p.name for p in (folder / "solutions").glob("*") if (p / "solution.json").is_file()
                        and p.name != "head_only")  # fmt: skip
        if inside:  # a run folder: its solutions are one level down
            raise UserError(f"{folder} is a run folder, not a solution: pass one of its solutions, "
                            f"{folder / 'solutions'}/{{{','.join(inside)}}}") from None  # fmt: skip
        raise UserError(f"{folder} has no solution.json: it is not a solution folder written by this tool") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{folder}/solution.json is corrupt ({e.msg}): re-train or re-copy the solution") from None
    if info.get("method") not in METHODS or "model" not in info or "num_classes" not in info:
        raise UserError(f"{folder}/solution.json lacks method/model/num_classes: re-train the solution")
    return info


def load_solution(
    folder: str | Path, base: Classifier | None = None, expect_method: str | None = None, model: str | None = None
) -> Solution:
    """Load a solution folder. ``base`` (optional) is a base model already built for it;
    ``expect_method``: the method the caller takes it for (a LoRA folder given as ``ft=`` is refused).

    A path trained elsewhere (a peft adapter folder, a full checkpoint: :mod:`adapters.foreign`) loads onto
    ``base`` (default: an adapter's ``base_model_name_or_path``); ``model`` names that base in messages.
    The weights are read and checked (NaN/inf, names, shapes) now, streaming, and not kept."""
    folder = Path(folder)
    if foreign.is_foreign(folder):
        return _load_foreign(folder, base, expect_method, model)
    info = read_info(folder)
    check_method(folder, info, expect_method)
    check_files(folder, info)
    if base is None:
        base = build_base(info)
    check_base(folder, info, base)
    metrics_file = folder / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    solution = Solution(path=folder, info=info, metrics=metrics, base=base)
    solution.module_deltas()  # read and validate the weights now (one ΔW at a time), so errors surface at load
    return solution


def _load_foreign(folder: Path, base: Classifier | None, expect_method: str | None, model: str | None) -> Solution:
    info = foreign.describe(folder)
    foreign.check_slot(folder, info, expect_method)
    if base is None:
        model = model or foreign.default_model(folder, info)
        base = build_base({"model": model, "num_classes": 1, "modality": foreign.modality_of(model)})
    return load_foreign(folder, base, info, model)


def load_solutions(
    named: dict[str, Path], model: str | None = None, num_classes: int | None = None
) -> dict[str, Solution]:
    """Load solutions given by name (``{name: path}``) onto one shared base model.

    A path is a solution folder written by this tool (``solution.json``: :func:`load_solution`) or one
    trained elsewhere (:mod:`adapters.foreign`: a peft adapter folder of any type that merges, a full
    checkpoint). The base is ``model`` (default: the first tool solution's, else the first adapter's
    ``base_model_name_or_path``) with ``num_classes`` classes (default: the first tool solution's, else 1),
    built for the tool solutions' modality, else the model's own (:func:`adapters.foreign.modality_of`:
    ``lm`` for a causal LM). Every tool solution must come from that model (and its base weights:
    fingerprint checked); a foreign one must fit it (module names and shapes checked).
    """
    if not named:
        raise UserError("no solutions given: pass NAME=PATH for each solution folder")
    infos = {name: _given_info(name, Path(path)) for name, path in named.items()}
    own = [info for info in infos.values() if info.get("source") not in foreign.SOURCES]
    first = own[0] if own else {}
    if model is None:
        name = next(iter(infos))
        model = first["model"] if first else foreign.default_model(named[name], infos[name])
    classes = num_classes or int(first.get("num_classes", 1))
    for name, info in infos.items():
        if info.get("source") not in foreign.SOURCES and info["model"] != model:
            raise UserError(f"solution {name} was trained from {info['model']}, not {model}: pass matching solutions")
    names = first.get("classes") if int(first.get("num_classes", -1)) == classes else None
    modality = first.get("modality") or foreign.modality_of(model)
    base = build_base({**first, "model": model, "num_classes": classes, "classes": names, "modality": modality})
    solutions = {}
    for name, path in named.items():
        if infos[name].get("source") in foreign.SOURCES:
            solutions[name] = load_foreign(Path(path), base, infos[name], model)
        else:
            solutions[name] = load_solution(path, base=base)
    return solutions


def _given_info(name: str, path: Path) -> dict:
    """The solution.json of a tool-written folder, or the info of a solution trained elsewhere."""
    if foreign.is_foreign(path):
        return foreign.describe(path, name)
    if not path.exists():
        raise UserError(f"solution folder {path} does not exist: pass a folder written by landscape.connectivity")
    if not path.is_dir():
        raise UserError(
            f"{path} is not a solution: pass a solution folder, a peft adapter folder, a model folder, a "
            ".safetensors file or a state-dict file (.pt, .pth, .bin)"
        )
    if not (path / "solution.json").exists():
        raise UserError(
            f"{path} has neither solution.json, adapter_config.json nor config.json: not a solution folder, a peft "
            "adapter or a model folder"
        )
    return read_info(path)


def check_method(folder: Path, info: dict, expect_method: str | None) -> None:
    """UserError when a solution is given under another method's name (``ft=<a LoRA folder>``)."""
    if expect_method not in (None, "head_only") and info["method"] == "head_only":
        raise UserError(f"{folder} is the head-only baseline (the base model with a trained head), not a "
                        f"{expect_method} solution: pass a {expect_method} solution folder")  # fmt: skip
    if expect_method is not None and info["method"] != expect_method:
        raise UserError(
            f"{folder} is a {info['method']} solution, not {expect_method}: pass {info['method']}={folder} "
            f"or a {expect_method} solution folder"
        )


def file_record(folder: Path) -> dict[str, str]:
    """The sha256 of each file of a solution folder that solution.json records (:data:`UNSEALED` left out)."""
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name not in UNSEALED}


def check_files(folder: Path, info: dict) -> None:
    """UserError when a file of a solution folder no longer has the sha256 that its solution.json recorded at the
    save (a solution saved before the record has none; a missing file is left to the loader that reads it). Costs
    one read of each file: sha256 ran at 1.4 GB/s on the 2-core EPYC, about 11 s for an 8B model's bf16 FT."""
    for name, expected in info.get("sha256", {}).items():
        path = folder / name
        if path.is_file() and file_sha256(path) != expected:
            raise UserError(
                f"{path} is not the file saved with this solution (its sha256 differs from the one in solution.json: "
                "damaged or changed since): re-copy the solution folder, or delete it and rerun the command that "
                'trained it (changed on purpose: delete the "sha256" entry of its solution.json)'
            )


def build_base(info: dict) -> Classifier:
    """The base model a solution was trained from (its model, classes and model options), built
    under the solution's seed as the main job builds it (:func:`adapters.models.build_base`)."""
    n = int(info["num_classes"])
    classes = info.get("classes") or [f"class {i}" for i in range(n)]
    return build_base_model(info["model"], classes, info.get("model_options"), int(info.get("seed", 0)),
                            modality=info.get("modality", "text"))  # fmt: skip


def check_base(folder: Path, info: dict, base: Classifier) -> None:
    check_quantization(folder, info, base)  # before the fingerprint, which a 4-bit or other-dtype base also fails
    expected = info.get("base_fingerprint")
    if hasattr(base, "num_classes") and base.num_classes != int(info["num_classes"]):  # LMs have no classes
        raise UserError(
            f"solution {folder} has {info['num_classes']} classes but the base model has "
            f"{base.num_classes}: use a solution trained on the same dataset"
        )
    if expected and expected != fingerprint(base):
        raise UserError(
            f"solution {folder} was trained from a different base model ({info['model']}, fingerprint "
            f"{expected}): use solutions trained from the same pretrained weights"
        )


def check_quantization(folder: Path, info: dict, base: nn.Module) -> None:
    """A solution goes onto a base of the quantisation and dtype it was trained on (info ``base_quantization``,
    recorded since 4-bit support): another quantisation or weights' dtype is a UserError naming the flag that
    fixes it; another 4-bit compute dtype (the same weights, other rounding) is a printed note."""
    recorded = info.get("base_quantization")
    if not recorded:
        return
    from adapters.quant import base_quantization

    here = base_quantization(base)
    if recorded.get("quantization") != here["quantization"]:
        was, now = recorded.get("quantization"), here["quantization"]
        fix = "pass --load-4bit" if was else "drop --load-4bit"
        raise UserError(
            f"solution {folder} was trained on a {f'4-bit ({was})' if was else 'unquantised'} base but this base is "
            f"{f'4-bit ({now})' if now else 'not quantised'}: {fix} (or re-train it on this base)"
        )
    if recorded.get("torch_dtype") != here["torch_dtype"]:
        raise UserError(
            f"solution {folder} was trained on a {recorded.get('torch_dtype')} base but this base is "
            f"{here['torch_dtype']}: pass --torch-dtype {recorded.get('torch_dtype')} (or re-train it on this base)"
        )
    if recorded.get("compute_dtype") != here["compute_dtype"]:
        print(f"note: solution {folder} was trained with 4-bit compute in {recorded.get('compute_dtype')}, this base "
              f"computes in {here['compute_dtype']}: same weights, other rounding", file=sys.stderr)  # fmt: skip
