"""What every model family provides: a classifier module and an encoder for its raw inputs.

A model family turns raw dataset inputs (strings, uint8 images) into model-ready tensors
once (``Encoder``), and builds a ``Classifier``: a pretrained backbone with a new linear
head. The head starts at zero, so the base model (what ΔW is relative to) is fully
determined by the pretrained weights and the number of classes — no seed needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from adapters.errors import UserError

# Not "head": peft matches modules_to_save by name suffix, and e.g. EfficientNet's `_conv_head` ends in "head".
HEAD = "task_head"


class Classifier(nn.Module):
    """A backbone producing features and a linear ``head`` producing logits."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.task_head = nn.Linear(feature_dim, num_classes)
        nn.init.zeros_(self.task_head.weight)
        nn.init.zeros_(self.task_head.bias)

    def features(self, **inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.task_head(self.features(**inputs))

    @property
    def num_classes(self) -> int:
        return self.task_head.out_features

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        freeze_norm_statistics(self)
        return self


def freeze_norm_statistics(model: nn.Module) -> None:
    """Keep every BatchNorm in eval mode: its running statistics stay at their pretrained values in
    every method, so all solutions share them, the saved parameters describe the trained model
    completely, and the landscape is a function of the parameters alone."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


@dataclass
class Encoded:
    """Model-ready tensors for a whole split, first dimension = sample.

    ``lengths`` (text only) holds the number of real tokens per sample; ``batch`` trims
    the padding of each batch to its longest sample, so sorting by length makes
    padding almost free.
    """

    tensors: dict[str, torch.Tensor]
    lengths: torch.Tensor | None = None

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def batch(self, index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
        out = {k: v[index] for k, v in self.tensors.items()}
        if self.lengths is not None:
            width = int(self.lengths[index].max())
            out = {k: v[..., :width] for k, v in out.items()}
        return out

    def to(self, device: torch.device | str) -> Encoded:
        lengths = self.lengths
        return Encoded({k: v.to(device) for k, v in self.tensors.items()}, lengths)

    @property
    def has_candidates(self) -> bool:
        """Whether each sample holds several sequences (a causal-LM sample's candidates: (N, C, T) inputs)."""
        mask = self.tensors.get("attention_mask")
        return mask is not None and mask.dim() == 3

    def sequences(self) -> torch.Tensor:
        """Real sequences per sample: the candidates of a causal-LM sample (``attention_mask`` (N, C, T), all-zero
        rows are padding candidates), else 1."""
        if self.has_candidates:
            return self.tensors["attention_mask"].bool().any(-1).sum(-1)
        return torch.ones(len(self), dtype=torch.int64)

    def token_batches(self, budget: int) -> list[torch.Tensor]:
        """Sample indices in length order, cut into batches of at most ``budget`` padded tokens.

        A batch's padded size is its real sequences (:meth:`sequences`: every candidate of a causal-LM sample)
        times its longest sample's length, the width :meth:`batch` trims to; a sample alone above the budget
        is a batch of its own. Short samples thus travel in large batches, long ones in small batches.
        """
        order = self.length_order()
        if self.lengths is None:
            raise ValueError("token_batches needs token lengths (text or causal-LM inputs)")
        lengths, rows = self.lengths[order].tolist(), self.sequences()[order].tolist()
        cuts, start, held = [0], 0, 0
        for k, (length, count) in enumerate(zip(lengths, rows, strict=True)):
            # sorted ascending: the batch's width is this (its last) sample's length
            if k > start and (held + count) * length > budget:
                cuts.append(k)
                start, held = k, 0
            held += count
        cuts.append(len(order))
        return [order[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]

    def length_order(self) -> torch.Tensor:
        """Sample order that groups similar lengths (identity for images)."""
        if self.lengths is None:
            return torch.arange(len(self))
        return torch.argsort(self.lengths, stable=True)


@dataclass(frozen=True)
class ModelEntry:
    """A registry entry: a name and what builds the model and its encoder."""

    name: str
    modality: str  # "text" or "image"
    description: str
    build: Callable[[int], Classifier]  # num_classes -> Classifier (pretrained backbone, zero head)
    encode: Callable[[Sequence | torch.Tensor], Encoded]  # raw split inputs -> Encoded
    # Module-name suffixes adapted by LoRA / RandLoRA (peft `target_modules`).
    targets: tuple[str, ...] = field(default_factory=tuple)
    # Defaults that suit the model: per-method learning rates, adapter ranks.
    defaults: dict = field(default_factory=dict)
    # Training augmentation: (inputs on the device, torch.Generator) -> inputs; None: none.
    augment: Callable | None = None
    # Names of the build options the model accepts (e.g. CLIP's "pretrained"), recorded with solutions.
    options: tuple[str, ...] = ()

    def create(self, classes: Sequence[str], options: dict | None = None) -> nn.Module:
        """The base model for a dataset's ``classes`` with build ``options`` (see :attr:`options`)."""
        options = {k: v for k, v in (options or {}).items() if v is not None}
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise UserError(f"model '{self.name}' takes no option {', '.join(unknown)}: those apply to CLIP models")
        if self.options:
            return self.build(len(classes), classes=list(classes), **options)
        return self.build(len(classes))


# ----------------------------------------------------------------- shared by the transformers wrappers


def set_checkpointing(model: nn.Module, enable: bool) -> None:
    """Activation checkpointing of a transformers model (non-reentrant); adapters keep their gradients."""
    kwargs = {"use_reentrant": False}
    if enable:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        embeddings = model.get_input_embeddings()
        # With frozen embeddings (adapters) the checkpointed blocks' input needs requires_grad for older
        # transformers / reentrant fallbacks; harmless otherwise.
        if embeddings is not None and not embeddings.weight.requires_grad:
            model.enable_input_require_grads()
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


class _Quantised:
    """Forwards transformers' ``is_loaded_in_4bit`` / ``is_loaded_in_8bit`` of the wrapped model: peft reads them
    on the model it adapts to wrap a bitsandbytes layer in its own quantised-layer class (``lora.bnb.Linear4bit``,
    ``randlora.bnb.Linear4bit``: forward beside the packed layer, merge by dequantising) instead of the plain one."""

    @property
    def is_loaded_in_4bit(self) -> bool:
        return bool(getattr(self.backbone, "is_loaded_in_4bit", False))

    @property
    def is_loaded_in_8bit(self) -> bool:
        return bool(getattr(self.backbone, "is_loaded_in_8bit", False))
