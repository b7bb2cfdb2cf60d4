"""The evaluators named in ``config.evals``: built once (data loaded), run on embedding functions.

Each entry of ``config.evals`` is ``name -> {kind, every, ...options}``; ``every`` is the period in train steps
(0: only at the end of training). Kinds plug in through `softalign.evaluation.base.register_evaluator`:
``zeroshot`` / ``synthetic_zeroshot`` (zeroshot.py), ``retrieval`` (retrieval.py), ``embedding_retrieval``
(embedding_retrieval.py: a precomputed-text model on a split's own text embeddings), ``linear_probe``
(linear_probe.py), ``multi_positive_retrieval`` / ``compositional_probe`` (ground_truth.py, synthetic only).
Results are fractions in [0, 1]; ``report_lines`` prints them as percentages beside chance.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

# Importing the kind modules registers them.
import softalign.evaluation.embedding_retrieval  # noqa: F401
import softalign.evaluation.ground_truth  # noqa: F401
import softalign.evaluation.linear_probe  # noqa: F401
import softalign.evaluation.nmtune  # noqa: F401
import softalign.evaluation.retrieval  # noqa: F401
import softalign.evaluation.zeroshot  # noqa: F401
from softalign.config import checks
from softalign.evaluation.base import (
    EncodeFn,
    EvalContext,
    Evaluator,
    ProgressFactory,
    build_evaluator,
    evaluator_kinds,
    register_evaluator,
)
from softalign.workdir import is_fraction

__all__ = ["EncodeFn", "EvalContext", "Evaluator", "build_evaluators", "evaluator_kinds", "register_evaluator",
           "report_lines"]


def build_evaluators(config: Any, tokenizer: Any, sharding=None, *, evals: Optional[Mapping[str, Any]] = None,
                     progress: Optional[ProgressFactory] = None) -> list[Evaluator]:
    """Builds every evaluator of ``config.evals`` (or of `evals`), loading its data once, sorted by name."""
    ctx = EvalContext(config.data, tokenizer, int(config.eval_batch_size), sharding, progress)
    evals = config.evals if evals is None else evals
    checks.check_text_free_evals(config, evals)  # a precomputed-text model runs only text-free kinds
    return [build_evaluator(name, options, ctx) for name, options in sorted(evals.items())]


def report_lines(name: str, metrics: dict[str, float], chance: dict[str, float]) -> list[str]:
    """Human-readable lines, each metric beside its chance level, e.g. ``heldout i2t_R@5 = 34.2% (chance 0.5%)``."""
    return [f"{name} {key} = {format_metric(key, value, chance.get(key))}" for key, value in metrics.items()]


def format_metric(key: str, value: float, chance: Optional[float] = None) -> str:
    """``34.2% (chance 0.5%)`` for fractions, ``12.0`` for ranks, ``3`` for counts."""
    if is_fraction(key):
        text = f"{100 * value:.1f}%"
        return text if chance is None else f"{text} (chance {100 * chance:.1f}%)"
    if key.startswith(("skipped", "dropped_caption", "num_")):
        return f"{int(value)}"
    return f"{value:.1f}" if "rank" in key else f"{value:.2f}"
