"""Per-parameter weight updates ΔW computed lazily, one parameter at a time, without a second model copy.

:func:`module_deltas` (also ``Solution.module_deltas()``) maps each parameter a solution changes to a
:class:`Delta`: a callable that returns that parameter's dense ΔW in **fp32** (whatever the model's
dtype), shaped like the base parameter, on the device of the tensors it is built from
(``W_file.float() − W0.float()``, or peft's ``get_delta_weight``); nothing is computed until it is
called and nothing is cached. :meth:`adapters.solution.Solution.delta` is :func:`materialise` of them.

- ``ft`` / ``head_only`` folders (``model.safetensors``): each call reads that one tensor through
  ``safetensors.safe_open`` (opened and closed per call, so the file's pages do not stay mapped) and
  subtracts W0. Kind ``"stored"``.
- peft adapter folders (``lora`` / ``randlora``): the adapter is attached with peft to a *skeleton* of
  the base model — a deep copy that shares every parameter and buffer tensor of the base (no weight is
  copied) — and each adapted module's ΔW is peft's ``get_delta_weight`` for that module (kind
  ``"factored"``: rebuilt from the factors on every call; :meth:`Delta.add_to` adds it into a tensor in
  one ``addmm`` from the factors, without a ΔW-sized temporary, for peft's Linear layers). Convolution /
  attention updates are reshaped to the base weight's shape (the flattened in_proj / conv kernel). The classification
  head (peft's ``modules_to_save``) is a dense difference of peft's trained copy and W0 (kind
  ``"stored"``). DoRA adapters are refused here: their update is not ``get_delta_weight``.
- solutions trained elsewhere (:mod:`adapters.foreign`): a peft adapter of any type that can merge
  (LoRA incl. DoRA / rsLoRA / ``lora_bias``, RandLoRA, VeRA, LoHa, LoKr, AdaLoRA, ...) gives per module
  (the merged weight) − W0 by peft's own ``merge()`` (:func:`merged_deltas`: one module at a time, on a
  private fp64 copy of that one layer's parameters; kind ``"factored"``, merged again on every call); a
  full checkpoint gives ``W − W0`` per tensor (:func:`stored_deltas`, kind ``"stored"``).

On a 4-bit base (``--load-4bit``: bitsandbytes ``Linear4bit`` layers, :mod:`adapters.quant`) every ΔW still has
the weight's logical (out, in) shape and is fp32: a stored W (an FT checkpoint, a head) gives W − the
*dequantised* W0 (so W0 + ΔW is W to fp32 rounding, quantisation error included); an adapter gives peft's
``get_delta_weight`` of its 4-bit layer (whose ``merge()`` re-quantises), and a plain peft layer around a packed
weight merges into a dequantised fp64 copy. Nothing is ever written into the packed weights.

With ``check=True`` (the default) every ΔW is computed once up front, streaming: NaN/inf raises the
same :class:`~adapters.errors.UserError` as ``delta()``, and all-zero updates are left out (``delta()``
leaves them out too), so the keys equal ``delta()``'s — except for a foreign solution, whose exactly-zero
updates are kept (and its ``delta()`` keeps them too: nothing is dropped silently). ``check=False`` skips
that pass (callers that stream over the deltas anyway, like :mod:`landscape.engine.factored`, check as they go).

The base model's tensors are shared, never modified: attaching peft to the skeleton changes
``requires_grad`` of the shared parameters, which is put back; a merge swaps private copies into the
skeleton's layer only (the skeleton's modules are not the base's). The skeleton lives as long as the
returned deltas do.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from adapters.errors import UserError, first_line
from adapters.quant import dequantized_weight, is_packed, logical_shape
from adapters.solutions.bf16_products import randlora_factors
from adapters.solutions.peft_config import PEFT_PREFIX, peft_config_of

KINDS = ("stored", "factored")


class Delta:
    """One parameter's ΔW, computed on call: fp32, shaped like the base parameter (module docstring).

    ``kind``: ``"stored"`` (read from a file or a dense difference: a caller that needs it often keeps
    it) or ``"factored"`` (rebuilt by peft from the adapter's factors on every call). ``source``: the
    file or folder it comes from, for messages.
    """

    def __init__(
        self,
        name: str,
        shape: torch.Size,
        kind: str,
        compute: Callable[[], torch.Tensor],
        source: str,
        mover: Callable[[torch.device], None] | None = None,
        accumulate: Callable[[torch.Tensor, float], None] | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        self.name, self.shape, self.kind, self.source = name, torch.Size(shape), kind, source
        self._compute, self._mover, self._accumulate = compute, mover, accumulate

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        return self._compute()

    @torch.no_grad()
    def add_to(self, out: torch.Tensor, alpha: float, bf16: bool = False) -> torch.Tensor:
        """``out += alpha·ΔW`` (``out`` shaped like the parameter). For peft's LoRA and RandLoRA Linear layers
        one ``addmm`` from the factors, with no ΔW-sized temporary (equal to adding ``self()`` to fp32
        rounding); otherwise ``self()`` is added.

        ``bf16``: ``out`` is bf16 and the caller accepts a bf16 product (a device that multiplies bf16 natively):
        the factors are rounded to bf16 and multiplied into ``out`` by one bf16 ``addmm`` (fp32 accumulation, one
        rounding of the sum). Its error against ``out + alpha·self()`` is at most 2U·Σ_k |alpha·F_ik·S_kj| (U = 2⁻⁸;
        about 2U·|alpha·ΔW|) from the factors' rounding, plus the one rounding of ``out`` (U of its magnitude) that
        the fp32 product rounded into bf16 has too (:mod:`adapters.solutions.bf16_products`)."""
        if self._accumulate is not None and (out.dtype in (torch.float32, torch.float64)
                                             or (bf16 and out.dtype == torch.bfloat16)):  # fmt: skip
            self._accumulate(out, alpha)
        else:
            out.add_(self().to(out.device), alpha=alpha)
        return out

    def to(self, device: torch.device | str) -> Delta:
        """Compute on ``device`` from now on (moves the adapter's own tensors, never the base model's)."""
        if self._mover is not None:
            self._mover(torch.device(device))
        return self

    def __repr__(self) -> str:
        return f"Delta({self.name!r}, {tuple(self.shape)}, {self.kind})"


def own_deltas(solution, check: bool = True) -> dict[str, Delta]:
    """{parameter name of the base model: :class:`Delta`} for every parameter a solution of this tool's own
    folders changes (a foreign one is read by :mod:`adapters.solutions.foreign`; the dispatch between the two
    is :func:`adapters.solutions.solution.module_deltas`, above this module)."""
    from adapters.methods import ADAPTERS

    base_params = dict(solution.base.named_parameters())
    if solution.method in ADAPTERS:
        deltas = adapter_deltas(Path(solution.path), solution.base)
    else:
        deltas = file_deltas(Path(solution.path) / "model.safetensors", base_params, solution.info.get("model"))
    return checked(deltas) if check else deltas


def materialise(deltas: dict[str, Delta], keep_zero: bool = False) -> dict[str, torch.Tensor]:
    """Every ΔW of ``deltas`` as a dense fp32 tensor, computed once; UserError on NaN/inf; all-zero updates
    left out unless ``keep_zero``."""
    out = {}
    for name, delta in deltas.items():
        d = delta()
        if not torch.isfinite(d).all():
            raise UserError(non_finite_message(delta))
        if keep_zero or d.any():
            out[name] = d
    return out


def checked(deltas: dict[str, Delta]) -> dict[str, Delta]:
    """``deltas`` without the all-zero updates; UserError on NaN/inf (one ΔW in memory at a time)."""
    kept = {}
    for name, delta in deltas.items():
        d = delta()
        if not torch.isfinite(d).all():
            raise UserError(non_finite_message(delta))
        if d.any():
            kept[name] = delta
        del d
    return kept


CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


def non_finite_message(delta: Delta) -> str:
    """The one-line error of a ΔW holding NaN/inf (the same words as ``Solution.delta()``)."""
    if delta.kind == "factored" or not delta.source.endswith(CHECKPOINT_SUFFIXES):
        return f"the adapter in {delta.source} has NaN/inf in '{delta.name}': training diverged; re-train it"
    return f"{delta.source} has NaN/inf in '{delta.name}': the training diverged; re-train it"


# --------------------------------------------------------------------------- ft / head_only: safetensors


def file_deltas(weights: Path, base_params: dict[str, torch.Tensor], model_name: str | None) -> dict[str, Delta]:
    """Lazy ``W_file − W0`` per tensor of ``weights``; names and shapes are checked now, from the header."""
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except FileNotFoundError:
        raise UserError(f"{weights} is missing: re-train or re-copy the solution") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{weights} is corrupt ({e}): re-train or re-copy the solution") from None
    deltas = {}
    for name, shape in shapes.items():
        if name not in base_params or tuple(logical_shape(base_params[name])) != shape:
            raise UserError(
                f"{weights} holds '{name}' {shape}, which the base model {model_name} lacks: the solution comes "
                "from another model"
            )
        deltas[name] = Delta(name, logical_shape(base_params[name]), "stored",
                             _file_reader(weights, name, base_params[name]), str(weights))  # fmt: skip
    return deltas


def _file_reader(weights: Path, name: str, w0: torch.Tensor) -> Callable[[], torch.Tensor]:
    def compute() -> torch.Tensor:
        try:
            with safe_open(str(weights), framework="pt", device="cpu") as f:
                value = f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{weights} is corrupt ({e}): re-train or re-copy the solution") from None
        # W_file − W0 in fp32, on W0's device
        return value.to(w0.device).float() - base_value(w0)

    return compute


# --------------------------------------------------------------------------- lora / randlora: peft


def skeleton(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares all its parameter and buffer tensors (only structure is copied)."""
    shared = [*model.parameters(), *model.buffers()]
    return copy.deepcopy(model, memo={id(t): t for t in shared})


def check_complete(folder: Path, peft_model: nn.Module) -> None:
    """The weights file holds every tensor of the adapter that peft built from its config. peft only warns about
    the others and leaves them at their initialisation (LoRA's B = 0: those layers' ΔW silently 0)."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict

    with safe_open(str(folder / SAFETENSORS_WEIGHTS_NAME), "pt") as f:
        saved = set(f.keys())
    lacking = [k for k in get_peft_model_state_dict(peft_model) if k not in saved]
    if lacking:
        raise UserError(f"the adapter in {folder} lacks the weight '{lacking[0]}'"
                        f"{f' (and {len(lacking) - 1} more)' if len(lacking) > 1 else ''}: the weights file is "
                        "incomplete; re-save it or re-train")  # fmt: skip


def load_adapter(folder: Path, base: nn.Module, config=None, key_mapping: dict[str, str] | None = None,
                 quiet: bool = False) -> nn.Module:  # fmt: skip
    """peft's model of the adapter in ``folder`` on a skeleton of ``base`` (bases verified for RandLoRA).

    ``config``: the peft config to use (default: the folder's, :func:`adapters.solution.peft_config_of`);
    ``key_mapping``: peft's renaming of the saved weights' module names (:func:`adapters.foreign.key_mapping`);
    ``quiet``: silence peft's warnings (the caller checks what they would say and reports it in one line).
    """
    from peft import PeftModel

    from adapters.methods.randlora_saving import BASES_FILE, verify_bases

    if not (folder / "adapter_config.json").exists():
        raise UserError(f"{folder} has no adapter_config.json: the adapter weights are missing; re-train it")
    flags = [(p, p.requires_grad) for p in base.parameters()]
    try:
        with warnings.catch_warnings(), _shared_read_once():  # "bases regenerated from the PRNG key": verified below
            warnings.filterwarnings("ignore", message=".*save_projection.*")
            if quiet:
                warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(skeleton(base), folder, config=config or peft_config_of(folder),
                                                   key_mapping=key_mapping or None)  # fmt: skip
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as e:
        # torch's load_state_dict error puts the tensor at fault ("size mismatch for ...") on its second line
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else first_line(e)
        raise UserError(
            f"cannot load the adapter in {folder} onto {type(base).__name__} ({detail[:300]}): the files are "
            "corrupt or come from another base model (or another rank than its adapter_config.json says)"
        ) from None
    finally:
        for p, flag in flags:  # peft froze the shared base parameters: the base model is not ours to change
            p.requires_grad_(flag)
    if (folder / BASES_FILE).exists():
        try:
            verify_bases(peft_model, folder)
        except ValueError as e:
            raise UserError(f"{folder}: {e}") from None
    return peft_model


# peft's shared projections: one tensor per adapter in the model, which peft's save_pretrained writes once per
# adapted layer (RandLoRA's and VeRA's random bases; save_projection=True)
SHARED_SUFFIXES = (".randlora_A", ".randlora_B", ".vera_A", ".vera_B")


def read_adapter_file(filename: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of an adapter's safetensors file, as ``safetensors.torch.load_file`` gives them, but with the
    copies of a shared projection read once: every later copy is compared with the first (read by ``pread``, one at
    a time, freed) and, when equal, stands for the same tensor object.

    Why (issue 20 point 3): a RandLoRA adapter saved by peft holds its bases, about one full weight matrix of the
    largest target's size, once per adapted layer: 7.5× the whole model for a 4-layer model, all of which
    peft's loader read into memory (a foreign plane peaked at 8× the model, its spectrum at 120× one layer).
    peft copies each of those keys into the same shared buffer anyway. A copy that differs is kept as its own
    tensor (peft then loads what the file says, as before)."""
    device = torch.device(device)
    first: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    handle = safe_open(str(filename), framework="pt", device="cpu", backend="pread")  # safetensors >= 0.8
    for key in handle.keys():  # noqa: SIM118 (safe_open has no iterator)
        suffix = next((x for x in SHARED_SUFFIXES if key.endswith(x) or f"{x}." in key), None)
        value = handle.get_tensor(key)
        if suffix is not None:
            tag = (key[key.index(suffix) :], tuple(value.shape))
            seen = first.get(tag)
            if seen is None:
                first[tag] = value = value.to(device)
            elif torch.equal(seen, value.to(seen.device)):
                value = seen
        out[key] = value.to(device)
        del value
    return out


@contextlib.contextmanager
def _shared_read_once():
    """peft's adapter loading (``load_peft_weights``) with :func:`read_adapter_file` as its safetensors reader.

    peft reads an adapter file whole with ``safetensors.torch.load_file`` (the module global of
    ``peft.utils.save_and_load``) and has no option to read shared tensors once; this swaps that one name for
    the duration of one load, so peft's own key mapping and state-dict loading run unchanged."""
    from peft.utils import save_and_load

    original = save_and_load.safe_load_file
    save_and_load.safe_load_file = read_adapter_file
    try:
        yield
    finally:
        save_and_load.safe_load_file = original


def adapter_deltas(folder: Path, base: nn.Module) -> dict[str, Delta]:
    """Lazy ΔW of every module the adapter in ``folder`` changes (module docstring)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, ModulesToSaveWrapper

    if not (folder / SAFETENSORS_WEIGHTS_NAME).is_file():  # the one weights file this tool writes
        raise UserError(f"{folder} has no {SAFETENSORS_WEIGHTS_NAME}: the adapter weights are missing; re-train it "
                        "or copy the file back")  # fmt: skip
    peft_model = load_adapter(folder, base)
    check_complete(folder, peft_model)  # a foreign adapter gets the same check under its key mapping (foreign.py)
    base_params = dict(base.named_parameters())
    shared = {id(t) for t in (*base.parameters(), *base.buffers())}
    mover = _adapter_mover(peft_model, shared)
    deltas: dict[str, Delta] = {}
    for name, module in peft_model.named_modules():
        short = name.removeprefix(PEFT_PREFIX)
        if isinstance(module, ModulesToSaveWrapper):
            for pname, p in module.modules_to_save["default"].named_parameters():
                key = f"{short}.{pname}"
                compute = _difference(p, base_params[key])
                deltas[key] = Delta(key, base_params[key].shape, "stored", compute, str(folder), mover)
        elif isinstance(module, BaseTunerLayer) and hasattr(module, "get_delta_weight"):
            if any(getattr(module, "use_dora", {}).values()):
                raise UserError(f"the adapter in {folder} uses DoRA: its update is not W0 + ΔW per module; "
                                "use the dense plane (--plane-storage dense)")  # fmt: skip
            key = f"{short}.{getattr(module, 'adapted_weight', 'weight')}"
            shape = logical_shape(base_params[key])  # (out, in), also of a packed 4-bit weight
            deltas[key] = Delta(key, shape, "factored", _peft_delta(module, shape), str(folder), mover,
                                _peft_accumulator(module, shape))  # fmt: skip
    return deltas


def stored_deltas(readers: dict[str, Callable[[], torch.Tensor]], base_params: dict[str, torch.Tensor],
                  sources: dict[str, str]) -> dict[str, Delta]:  # fmt: skip
    """Lazy ``W − W0`` per parameter: ``readers[name]()`` returns the stored W of base parameter ``name``
    (any dtype, read when called); ``sources[name]`` names its file for messages. Kind ``"stored"``."""
    deltas = {}
    for name, read in readers.items():
        w0 = base_params[name]
        deltas[name] = Delta(name, logical_shape(w0), "stored", _stored(read, w0), sources[name])
    return deltas


def _stored(read: Callable[[], torch.Tensor], w0: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: read().to(w0.device).float() - base_value(w0)


def base_value(w0: torch.Tensor) -> torch.Tensor:
    """W0 in fp32 as the base computes with it: a packed 4-bit weight dequantised (so ``W0 + ΔW`` is exactly
    the stored W up to fp32 rounding, and ΔW includes the base's quantisation error), else W0 itself."""
    return dequantized_weight(w0) if is_packed(w0) else w0.detach().float()


# --------------------------------------------------------------------------- any peft adapter: merge


def merged_deltas(peft_model: nn.Module, base: nn.Module, source: str) -> tuple[dict[str, Delta], dict[str, int]]:
    """ΔW of every module the adapter changes, as peft merges it, and the adapter's rank per adapted weight.

    ``peft_model``: the adapter attached to a skeleton of ``base`` (:func:`load_adapter` or
    :func:`adapters.foreign.attach`). Each tuner layer's ΔW is (its merged parameter) − W0 from the layer's
    own ``merge()`` (every variant's maths is peft's: DoRA's magnitude, ``lora_bias``, LoHa, ...), run on a
    private fp64 copy of that one layer's parameters and put back (:func:`merge_module`): fp64 so that
    ``W0 + ΔW − W0`` gives ΔW to fp32 accuracy however small it is next to W0. The weight always gets a
    :class:`Delta` (kind ``"factored"``, an all-zero one too); another parameter of the layer (a bias) only
    when the merge changes it. ``modules_to_save`` copies are dense differences (kind ``"stored"``).
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    base_params = dict(base.named_parameters())
    mover = _adapter_mover(peft_model, {id(t) for t in (*base.parameters(), *base.buffers())})
    deltas: dict[str, Delta] = {}
    ranks: dict[str, int] = {}
    for name, module in peft_model.named_modules():
        short = name.removeprefix(PEFT_PREFIX)
        if isinstance(module, ModulesToSaveWrapper):
            for pname, p in module.modules_to_save["default"].named_parameters():
                key = f"{short}.{pname}"
                deltas[key] = Delta(key, logical_shape(base_params[key]), "stored", _difference(p, base_params[key]),
                                    source, mover)  # fmt: skip
        elif isinstance(module, BaseTunerLayer) and hasattr(module, "merge"):
            weight = getattr(module, "adapted_weight", "weight")
            for pname in _merged_params(module, weight, source):
                key = f"{short}.{pname}"
                compute = _merged(module, pname, source, base_params[key], mover)
                shape = logical_shape(base_params[key])
                # plain LoRA / RandLoRA Linear (no DoRA, no lora_bias): ΔW is peft's get_delta_weight, added from
                # the factors in one addmm (no fp64 copy of the layer, no ΔW-sized temporary per build)
                plain = pname == weight and not _merge_changes_more(module)
                add = _peft_accumulator(module, shape) if plain else None
                deltas[key] = Delta(key, shape, "factored", compute, source, mover, add)
            r = getattr(module, "r", None)
            if isinstance(r, dict) and isinstance(r.get("default"), int):
                ranks[f"{short}.{weight}"] = r["default"]
    return deltas, ranks


def _merge_changes_more(module: nn.Module) -> bool:
    """Whether a tuner layer's merge may be more than W0 + get_delta_weight: DoRA's magnitude, ``lora_bias``, or any
    LoRA variant (peft ≥ 0.15 keeps DoRA and its kin in ``lora_variant``)."""
    flags = any(any(getattr(module, flag, {}).values()) for flag in ("use_dora", "lora_bias"))
    return flags or bool(getattr(module, "lora_variant", {}))


def _merged_params(module: nn.Module, weight: str, source: str) -> list[str]:
    """The base layer's parameters a merge changes: the adapted weight, and any other one (a bias) that
    one trial merge changes (layers with a single parameter need no trial)."""
    layer = module.get_base_layer()
    names = [k for k, p in layer._parameters.items() if p is not None]
    if names == [weight]:
        return names
    changed = merge_module(module, source)
    return [k for k in names if k == weight or (k in changed and bool(changed[k].any()))]


def _merged(
    module: nn.Module, pname: str, source: str, w0: torch.Tensor, mover: Callable
) -> Callable[[], torch.Tensor]:
    def compute() -> torch.Tensor:
        mover(w0.device)  # the merge adds the adapter's tensors to W0: they must be where W0 is (a no-op if so)
        return merge_module(module, source)[pname]

    return compute


@torch.no_grad()
def merge_module(module: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """{parameter name of the base layer: (merged − original) in fp32} for one peft tuner layer.

    The layer's parameters are swapped for private fp64 copies (a packed 4-bit weight: its dequantised values),
    peft's ``merge()`` runs on them, and the originals (shared with the base model) are put back whatever
    happens, the layer marked unmerged and its merge caches (DoRA's weight norm) dropped: only this one
    layer's parameters are ever copied. peft's own 4-bit layers (``lora.bnb.Linear4bit``, ...) merge by
    re-quantising, which would not give ΔW back: their ΔW is the ``get_delta_weight`` their merge adds.
    """
    layer = module.get_base_layer()
    if is_packed(layer) and type(module).__module__.endswith(".bnb"):
        return _packed_delta(module, layer, source)
    originals = {k: p for k, p in layer._parameters.items() if p is not None}
    before = {k: base_value(p).double() for k, p in originals.items()}
    try:
        for k, value in before.items():
            layer._parameters[k] = nn.Parameter(value.clone(), requires_grad=False)
        with warnings.catch_warnings():  # peft's notes on merging (e.g. rounding) are about its own use
            warnings.simplefilter("ignore")
            module.merge(adapter_names=["default"])
        return {k: (layer._parameters[k].detach() - before[k]).float() for k in originals}
    except (RuntimeError, ValueError, TypeError, NotImplementedError, AttributeError) as e:
        raise UserError(
            f"peft cannot merge the adapter in {source} into {type(layer).__name__} ({first_line(e)}): this "
            "adapter type or layer cannot be analysed as W0 + ΔW"
        ) from None
    finally:
        for k, p in originals.items():
            layer._parameters[k] = p
        if isinstance(getattr(module, "merged_adapters", None), list):
            module.merged_adapters.clear()
        if isinstance(getattr(module, "_caches", None), dict):
            module._caches.clear()


def _packed_delta(module: nn.Module, layer: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """{"weight": ΔW} of peft's 4-bit tuner layer: the ``get_delta_weight`` its ``merge()`` adds to the dequantised
    weight, fp32 in the logical (out, in) shape; DoRA and ``lora_bias`` (a merge changing more) are refused."""
    if any(getattr(module, "use_dora", {}).values()) or any(getattr(module, "lora_bias", {}).values()):
        raise UserError(f"the adapter in {source} uses DoRA or lora_bias on a 4-bit base: its merge is not W0 + ΔW "
                        "of the weight alone; load the base without --load-4bit")  # fmt: skip
    try:
        delta = peft_delta_weight(module).detach().float()
    except (RuntimeError, ValueError, TypeError, NotImplementedError, AttributeError) as e:
        raise UserError(f"peft cannot compute the update of the adapter in {source} on {type(layer).__name__} "
                        f"({first_line(e)}): load the base without --load-4bit") from None  # fmt: skip
    return {"weight": delta.reshape(logical_shape(layer))}


def peft_delta_weight(module: nn.Module, adapter: str = "default") -> torch.Tensor:
    """peft's ``get_delta_weight`` of a tuner layer. peft's RandLoRA 4-bit layer (``randlora.bnb.Linear4bit``,
    peft 0.21) multiplies its scaled bases in the reverse order of its own forward (a (K, K) or (in, in) matrix
    instead of (out, in)), so it gets the plain RandLoRA ``Linear``'s expression on the same bases, which is
    what its forward ``F.linear(F.linear(x, B), A)`` adds."""
    from peft.tuners.randlora.layer import Linear as RandLoraLinear
    from peft.tuners.randlora.layer import RandLoraLayer

    if isinstance(module, RandLoraLayer) and type(module).__module__.endswith(".bnb"):
        return RandLoraLinear.get_delta_weight(module, adapter)
    return module.get_delta_weight(adapter)


def _difference(trained: torch.Tensor, w0: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: trained.detach().to(w0.device).float() - base_value(w0)


def _peft_delta(module: nn.Module, shape: torch.Size) -> Callable[[], torch.Tensor]:
    def compute() -> torch.Tensor:
        d = peft_delta_weight(module).detach().float()
        return d.reshape(shape) if d.shape != shape else d  # conv kernels, attention in_proj

    return compute


def _peft_accumulator(module: nn.Module, shape: torch.Size) -> Callable[[torch.Tensor, float], None] | None:
    """``out += alpha·ΔW`` in one ``addmm`` from the factors of peft's LoRA / RandLoRA ``Linear`` (the maths of
    their ``get_delta_weight``: LoRA ``s·B@A``; RandLoRA ``(second.T @ first.T).T·s = first @ second·s`` from
    ``get_scaled_bases``); None for other layers (the caller adds the materialised ΔW)."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.randlora.layer import Linear as RandLoraLinear

    if getattr(module, "fan_in_fan_out", False) or len(shape) != 2:
        return None
    # peft's 4-bit layers (bitsandbytes imported only for them)
    lora, randlora = _bnb_linear4bit() if type(module).__module__.endswith(".bnb") else (None, None)
    if type(module) is LoraLinear or type(module) is lora:  # peft's 4-bit layers: the same factors, the same ΔW

        def add_lora(out: torch.Tensor, alpha: float) -> None:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            out.addmm_(b.to(out), a.to(out), alpha=alpha * module.scaling["default"])

        return add_lora
    if type(module) is RandLoraLinear or type(module) is randlora:

        def add_randlora(out: torch.Tensor, alpha: float) -> None:
            if out.dtype == torch.bfloat16:  # Delta.add_to(bf16=True): bf16 factors laid out for one fast addmm
                first, second = randlora_factors(module)
            else:
                second, first = module.get_scaled_bases("default")
            out.addmm_(first.to(out), second.to(out), alpha=alpha * module.scaling["default"])

        return add_randlora
    return None


def _bnb_linear4bit() -> tuple[type | None, type | None]:
    """peft's LoRA and RandLoRA layers around a bitsandbytes ``Linear4bit`` (None without bitsandbytes)."""
    try:
        from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
        from peft.tuners.randlora.bnb import Linear4bit as RandLoraLinear4bit
    except ImportError:
        return None, None
    return LoraLinear4bit, RandLoraLinear4bit


def _adapter_mover(peft_model: nn.Module, shared: set[int]) -> Callable[[torch.device], None]:
    """Moves the adapter's own tensors (factors, bases, the head's trained copy) to a device; the base
    model's shared tensors are left where they are (the caller owns them)."""
    state = {"device": None}

    def move(device: torch.device) -> None:
        if state["device"] == device:
            return
        with torch.no_grad():
            for module in peft_model.modules():
                for p in module._parameters.values():
                    if p is not None and id(p) not in shared and p.device != device:
                        p.data = p.data.to(device)
                for key, b in module._buffers.items():
                    if b is not None and id(b) not in shared and b.device != device:
                        module._buffers[key] = b.to(device)
        state["device"] = device

    return move


__all__ = [
    "KINDS",
    "Delta",
    "adapter_deltas",
    "checked",
    "file_deltas",
    "load_adapter",
    "merge_module",
    "merged_deltas",
    "own_deltas",
    "skeleton",
    "stored_deltas",
]
