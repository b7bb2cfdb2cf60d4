"""The evaluator interface and registry that `suite.build_evaluators` dispatches on.

An evaluator kind is a builder ``fn(name, options, ctx) -> Evaluator`` registered with ``@register_evaluator(kind)``.
The builder loads its data once (`softalign.evaluation.datasets`); the returned ``Evaluator.run(encode_image,
encode_text)`` embeds with the given (already compiled) functions and returns metrics as fractions in [0, 1]
(ranks and counts as plain numbers). Evaluators never see a train state, so they run on any checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import numpy as np

from softalign.config.errors import ConfigError
from softalign.evaluation.datasets import ImageContext, as_dict, check_keys
from softalign.evaluation.embedding import embed_in_batches
from softalign.evaluation.images import ImageSet, embed_images

EncodeFn = Callable[[np.ndarray], Any]  # already compiled, e.g. functools.partial(jitted_apply, params)
ProgressFactory = Callable[[str], Callable[[int, int], None]]  # label -> progress(done, total)
COMMON_OPTIONS = ("kind", "every")


@dataclasses.dataclass
class Evaluator:
    """A named evaluation: ``run(encode_image, encode_text) -> metrics``, with chance levels for reporting."""

    name: str
    every: int
    run: Callable[[EncodeFn, EncodeFn], dict[str, float]]
    chance: dict[str, float]
    num_images: int = 0  # images it embeds per run (for throughput reports)

    def due(self, step: int, last_step: int) -> bool:
        return step == last_step or (self.every > 0 and step % self.every == 0)


@dataclasses.dataclass
class EvalContext:
    """What builders get from the run: data config, tokenizer, eval batch size, batch sharding, progress."""

    data_config: Any
    tokenizer: Any
    batch_size: int
    sharding: Any = None
    progress: Optional[ProgressFactory] = None

    @property
    def images(self) -> ImageContext:
        return ImageContext.from_data_config(self.data_config)

    def _progress(self, label: str) -> Optional[Callable[[int, int], None]]:
        return None if self.progress is None else self.progress(label)

    def embed_images(self, encode_image: EncodeFn, images: ImageSet, label: str) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings of the readable images, their indices), in padded batches of `batch_size`."""
        return embed_images(encode_image, images, self.batch_size, self.sharding, progress=self._progress(label))

    def embed_tokens(self, encode_text: EncodeFn, tokens: np.ndarray, label: Optional[str] = None) -> np.ndarray:
        """Text embeddings of `tokens` (n, L) in padded batches; progress counted in rows when `label` is given."""
        report = self._progress(label) if label else None
        n = len(tokens)
        progress = None if report is None else (lambda done, _: report(min(done * self.batch_size, n), n))
        return embed_in_batches(encode_text, tokens, self.batch_size, self.sharding, jit=False, progress=progress)


Builder = Callable[[str, Any, EvalContext], Evaluator]
_KINDS: dict[str, Builder] = {}


def register_evaluator(kind: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``fn(name, options, ctx) -> Evaluator`` as ``config.evals.<name>.kind = kind``."""

    def decorator(fn: Builder) -> Builder:
        if kind in _KINDS and _KINDS[kind] is not fn:
            raise ValueError(f"evaluator kind {kind!r} is already registered")
        _KINDS[kind] = fn
        return fn

    return decorator


def evaluator_kinds() -> list[str]:
    return sorted(_KINDS)


def build_evaluator(name: str, options: Any, ctx: EvalContext) -> Evaluator:
    options = as_dict(options)
    kind = options.get("kind")
    if kind not in _KINDS:
        raise ConfigError(f"evals.{name}.kind={kind!r} is unknown; choose one of {evaluator_kinds()}")
    return _KINDS[kind](name, options, ctx)


def options_of(name: str, options: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    """``options`` as a dict, after checking its keys against ``COMMON_OPTIONS + allowed``."""
    options = as_dict(options)
    check_keys(f"evals.{name}", options, COMMON_OPTIONS + allowed)
    return options


def every_of(options: dict[str, Any]) -> int:
    return int(options.get("every") or 0)


def with_skipped(metrics: dict[str, float], images: ImageSet,
                 counts: Optional[dict[str, int]] = None) -> dict[str, float]:
    """Adds what was left out, so it shows next to the scores (and in ``eval_results.json``): ``skipped_images``
    and, named as training names them, ``skipped/<reason>`` per left-out image or record and
    ``dropped_caption/<reason>`` per unusable caption of a kept one (``counts``: those found before the images)."""
    if images.skipped:
        metrics["skipped_images"] = float(images.skipped)
    total: dict[str, int] = dict(counts or {})
    for key, n in images.skip_counts().items():
        total[key] = total.get(key, 0) + n
    metrics.update({key: float(n) for key, n in sorted(total.items()) if n})
    return metrics
