"""Standalone evaluators that take embedding functions or embeddings, never a train state.

Definitions (CLIP_benchmark / open_clip): zero-shot classification (zeroshot.py), image-text retrieval with several
captions per image (retrieval.py), linear probe (linear_probe.py), robustness report (robustness.py). Datasets come
from specs (datasets.py); the in-training suite (suite.py) builds them from ``config.evals``. The probe function is
not re-exported here (it would shadow its module): ``from softalign.evaluation.linear_probe import linear_probe``.
"""

from softalign.evaluation.embedding import embed_batches, embed_in_batches
from softalign.evaluation.retrieval import retrieval_chance, retrieval_metrics
from softalign.evaluation.robustness import RobustnessPoint, robustness_report, robustness_table
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
    "RobustnessPoint",
    "build_classifier",
    "embed_batches",
    "embed_in_batches",
    "get_templates",
    "retrieval_chance",
    "retrieval_metrics",
    "robustness_report",
    "robustness_table",
    "zero_shot_metrics",
]
