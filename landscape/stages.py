"""Stage keys and ``stages.json``: what each stage of a run reads, and the record of each finished stage.

A rerun in the same ``--out`` reuses a stage's files only when the stage's key, a digest of everything it reads,
is the one recorded when those files were written. :data:`STAGE_READS` lists, per stage, the configuration fields
and the run's inputs it reads; :func:`stage_key` digests them. The inputs are content digests
(:func:`run_inputs`): the base model (name, build options, weights, 4-bit quantisation), the solutions (their ΔW),
the evaluation set (the chosen examples as encoded: subset, ``--cutoff-len``, tokenizer), the forward precision
resolved on this device, the objective and the plane's storage. The configuration fields that produce those inputs
are keyed as well, so a digest that misses something (a buffer, a quantisation constant) is backed by the setting
that changed it.

:class:`StageLog` keeps ``stages.json`` in the run folder: one record per stage (its key, what the key covers,
when it finished, its wall time, its output files, a small summary), rewritten atomically as each stage finishes.
A run that dies in curvature or render so keeps the reuse of its paths and spectra (``landscape.json``, the
summary, is written last). A stage about to be recomputed first loses its record, so files half rewritten by a
run that dies are never taken for the old ones.

The solutions themselves are keyed in their own folders (``solution.json``'s ``train_key``), and grid points in
``.grid`` (:class:`landscape.engine.store.GridStore`); their records here say what they were computed from.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.io import key_digest, write_json
from landscape.config_checks import LAUNCH_OPTIONS

FILE = "stages.json"
VERSION = 1

# --- which configuration fields reach a stage, by what they set (every RunConfig field is in exactly one group;
# tests/test_stages.py checks it, so a new setting must be placed)
FIELD_GROUPS: dict[str, tuple[str, ...]] = {
    # the base model: its name, weights and build options (a 4-bit base, its dtype, the LM's cutoff, CLIP's weights)
    "base": (
        "model",
        "targets",
        "torch_dtype",
        "load_4bit",
        "cutoff_len",
        "pretrained",
        "prompt_template",
        "paper_temperature",
    ),
    # the evaluation set: which examples, encoded how, in which batches
    "eval": (
        "dataset",
        "data_root",
        "tasks",
        "train_per_class",
        "test_per_class",
        "eval_split",
        "eval_samples",
        "eval_batch",
        "eval_tokens",
        "seed",
    ),
    # how the solutions are trained (they reach the analyses through their ΔW digests)
    "training": (
        "methods",
        "solutions",
        "train_steps",
        "epochs",
        "batch_size",
        "grad_accum",
        "grad_checkpointing",
        "weight_decay",
        "grad_clip",
        "augment",
        "train_dtype",
        "lr",
        "randlora_rank",
        "randlora_alpha",
        "randlora_dropout",
        "projection_prng_key",
        "lora_rank",
        "generate_eval",
    ),
    # the plane's chart and grid
    "chart": (
        "chart",
        "center",
        "direction_seed",
        "direction_norm",
        "ignore",
        "coordinates",
        "draws",
        "grid",
        "x_range",
        "y_range",
        "plane_storage",
    ),
    "precision": ("dtype",),
    "paths": ("path_points", "path_extend"),
    "curvature": ("curvature",),
    "merges": ("merges",),  # landscape.merges' stage (--merges); merges.json is rewritten whenever it runs
    "layerwise": ("layerwise",),  # landscape.layerwise's stage (--layerwise); rewritten whenever it runs
    "basins": ("basins",),  # landscape.basins' stage (--basins); rewritten whenever it runs
    "blocks": ("blocks",),  # landscape.curvature --blocks as a stage (--blocks); its entries are reused by key
    # how the run runs, not what it computes (points per forward: the same numbers, tested in test_grid_batched)
    "run": (
        "device",
        "threads",
        "out",
        "restart",
        "progress",
        "preset",
        "config_file",
        "points_per_forward",
        "sources",
        # FSDP2 vs DDP: the same training (tests/test_fsdp.py: 2 processes equal 1 to 1e-6), as with torchrun itself
        "fsdp",
        # the extra seeds' solutions and readings are keyed apart (landscape.seeds): the plane is --seed's
        "seeds",
        # the launcher (landscape.launch): the jobs compute what one process computes (tests/test_launcher.py)
        *LAUNCH_OPTIONS,
    ),
}

# --- the run's inputs, as digests (run_inputs)
INPUTS = {
    "base": "the base model: name, build options, weights digest, 4-bit quantisation",
    "solutions": "the ΔW digests of the solutions (and of a random chart's centre)",
    "eval": "the evaluation batches' digest (the chosen examples as encoded, labels, batching)",
    "precision": "the forward dtype resolved on this device (auto: bf16 where native, else fp32)",
    "objective": "the loss (classification or an LM's answer loss)",
    "storage": "how the plane holds the solutions (dense or factored)",
    "device": "the device the stage computes on",
}


@dataclass(frozen=True)
class Reads:
    """What a stage reads: configuration fields, run inputs, and the version of what it writes."""

    config: tuple[str, ...]
    inputs: tuple[str, ...]
    format: int = 1  # raise when what the stage writes changes: older results are redone


def _fields(*groups: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    return tuple(f for g in groups for f in FIELD_GROUPS[g]) + tuple(extra)


STAGE_READS: dict[str, Reads] = {
    # the grid: its points are checkpointed under the GridStore key; recorded here once landscape.npz is written
    "grid": Reads(
        _fields("base", "eval", "training", "chart", "precision"),
        ("base", "solutions", "eval", "precision", "objective", "storage"),
    ),
    # 2: chord barriers; 3: barrier is the chord barrier, Frankle's quantity peak_above_endpoint_mean
    "paths": Reads(
        _fields("base", "eval", "training", "precision", "paths", extra=("chart", "plane_storage")),
        ("base", "solutions", "eval", "precision", "objective", "storage"),
        format=3,
    ),
    # spectra of ΔW and of W0, W0 + ΔW (so the base); 2: W0 and W0 + ΔW spectra
    "spectrum": Reads(_fields("base", "training"), ("base", "solutions", "device"), format=2),
    # curvature.json keys its own entries (landscape.curvature); recorded here
    "curvature": Reads(_fields("base", "eval", "training", "curvature"), ("base", "solutions", "eval", "objective")),
}
REUSED = ("paths", "spectrum")  # stages whose files a rerun takes from stages.json


def stage_key(stage: str, config, inputs: Mapping[str, str]) -> dict:
    """Everything ``stage`` reads (:data:`STAGE_READS`): its configuration fields' values and its inputs' digests."""
    reads = STAGE_READS[stage]
    settings = config.to_dict()
    return {
        "stage": stage,
        "format": reads.format,
        # a setting the run leaves out of its record (--draws off a random chart, --seeds 1) is not read
        "config": {f: settings[f] for f in reads.config if f in settings},
        "inputs": {k: inputs[k] for k in reads.inputs},
    }


def stage_digest(stage: str, config, inputs: Mapping[str, str]) -> str:
    return key_digest(stage_key(stage, config, inputs))


def base_digest(loaded) -> str:
    """The base model a run loaded: its name, build options, weights digest and (4-bit) quantisation."""
    from adapters.quant import base_quantization

    options = loaded.model_options or {}
    quant = base_quantization(loaded.task.base) if options.get("load_4bit") else None
    return key_digest({"model": loaded.model_name, "options": options, "weights": loaded.base_fingerprint,
                       "quantization": quant})  # fmt: skip


def run_inputs(loaded, solution_deltas: Mapping[str, str], evaluator, device, precision: str) -> dict[str, str]:
    """The digests of :data:`INPUTS` for a run: ``solution_deltas`` are the solutions' ΔW fingerprints."""
    from landscape.engine.grid import eval_fingerprint

    return {
        "base": base_digest(loaded),
        "solutions": key_digest(dict(solution_deltas)),
        "eval": eval_fingerprint(evaluator.eval_set),
        "precision": precision,
        "objective": loaded.task.objective.name,
        "storage": evaluator.chart.info.get("storage", "dense"),
        "device": str(device),
    }


def encoded_digest(encoded, chunk_bytes: int = 1 << 26) -> str:
    """Digest of a split encoded for the model (:class:`adapters.models.base.Encoded`: its tensors and lengths),
    hashed in their own dtype a slice at a time: a split of images costs no fp32 copy of itself."""
    h = hashlib.sha256()
    tensors = getattr(encoded, "tensors", None)
    items = sorted(tensors.items()) if isinstance(tensors, dict) else []
    if getattr(encoded, "lengths", None) is not None:
        items.append(("lengths", encoded.lengths))
    for name, tensor in items:
        tensor = tensor.detach().cpu()
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        rows = max(1, chunk_bytes // max(1, tensor[:1].numel() * tensor.element_size())) if tensor.dim() else 1
        flat = tensor.reshape(1) if tensor.dim() == 0 else tensor
        for start in range(0, len(flat), rows):
            h.update(flat[start : start + rows].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _file_digest(path: Path) -> str | None:
    """sha256 of a file's bytes; "folder" for a folder (a solution), None when missing. Outputs are small."""
    if path.is_dir():
        return "folder"
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except FileNotFoundError:
        return None


def read(out: str | Path) -> dict:
    """The stage records of ``out``'s stages.json ({} when there is none or it is unreadable)."""
    try:
        data = json.loads((Path(out) / FILE).read_text())
    except (OSError, ValueError):
        return {}
    stages = data.get("stages") if isinstance(data, dict) and data.get("version") == VERSION else None
    return stages if isinstance(stages, dict) else {}


class StageLog:
    """``stages.json`` of a run folder: the records of the finished stages, rewritten as each finishes.

    ``write=False`` (the other ranks of a torchrun): reads only."""

    def __init__(self, out: str | Path, write: bool = True):
        self.out = Path(out)
        self.write = write
        self.records: dict[str, dict] = read(self.out)

    def reusable(self, stage: str, key: str) -> dict | None:
        """The record of ``stage`` when its files came from the same inputs: same key, and every output present
        with the content it was recorded with (``landscape.paths --run`` or ``landscape.spectrum --run`` may
        have rewritten one since, with other settings)."""
        record = self.records.get(stage)
        if not isinstance(record, dict) or record.get("key") != key:
            return None
        outputs, contents = record.get("outputs") or [], record.get("contents") or {}
        if not outputs or any(_file_digest(self.out / name) != contents.get(name) for name in outputs):
            return None
        return record

    def forget(self, stage: str) -> None:
        """Drop ``stage``'s record before recomputing it: files half rewritten are never taken for the old ones."""
        if self.records.pop(stage, None) is not None:
            self._save()

    def record(self, stage: str, key: str, outputs: Sequence[str | Path], seconds: float | None = None,
               reads: Mapping | None = None, summary=None) -> None:  # fmt: skip
        """``stage`` finished: its key, what the key covers, its output files (relative to the run folder)."""
        names = [str(Path(p).relative_to(self.out)) if Path(p).is_absolute() else str(p) for p in outputs]
        self.records[stage] = {
            "key": key,
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "seconds": seconds,
            "outputs": names,
            "contents": {name: _file_digest(self.out / name) for name in names},
            **({"reads": dict(reads)} if reads is not None else {}),
            **({"summary": summary} if summary is not None else {}),
        }
        self._save()

    def keep(self, stage: str, key: str, outputs: Sequence[str | Path], seconds: float | None = None) -> None:
        """Record ``stage`` unless its record already has this key (a reused result keeps when it was made)."""
        if (self.records.get(stage) or {}).get("key") != key:
            self.record(stage, key, outputs, seconds)

    def seconds(self) -> dict[str, float]:
        """Wall time per recorded stage (a reused stage keeps the time of the run that computed it)."""
        records = self.records.items()
        return {k: r["seconds"] for k, r in records if isinstance(r, dict) and r.get("seconds") is not None}

    def _save(self) -> None:
        if self.write:
            write_json(self.out / FILE, {"version": VERSION, "stages": self.records})


__all__ = [
    "FIELD_GROUPS",
    "INPUTS",
    "REUSED",
    "STAGE_READS",
    "Reads",
    "StageLog",
    "encoded_digest",
    "read",
    "run_inputs",
    "stage_digest",
    "stage_key",
]
