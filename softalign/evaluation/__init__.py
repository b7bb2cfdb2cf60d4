"""Standalone evaluators that take embedding functions or embeddings, never a train state."""

from softalign.evaluation.embedding import embed_in_batches
from softalign.evaluation.retrieval import retrieval_chance, retrieval_metrics
from softalign.evaluation.zeroshot import (
    DATASET_TEMPLATES,
    DEFAULT_TEMPLATES,
    build_classifier,
    get_templates,
    zero_shot_metrics,
)

__all__ = [
    "DATASET_TEMPLATES",
    "DEFAULT_TEMPLATES",
    "build_classifier",
    "embed_in_batches",
    "get_templates",
    "retrieval_chance",
    "retrieval_metrics",
    "zero_shot_metrics",
]
