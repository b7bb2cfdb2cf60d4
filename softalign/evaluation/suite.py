"""The evaluators named in ``config.evals``: built once (data materialised), run on embedding functions.

Each entry of ``config.evals`` is ``name -> {kind, every, ...options}``; ``every`` is the period in train steps
(0: only at the end of training). Results are fractions in [0, 1]; ``report_lines`` prints them as percentages
beside their chance level.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from softalign.data import pipeline, synthetic
from softalign.data.sources import build_source
from softalign.evaluation.embedding import embed_in_batches
from softalign.evaluation.retrieval import retrieval_chance, retrieval_metrics
from softalign.evaluation.zeroshot import build_classifier, zero_shot_metrics

EncodeFn = Callable[[np.ndarray], Any]  # already compiled, e.g. functools.partial(jitted_apply, params)

# Our own prompt wording for zero-shot on synthetic scene attributes ("{}" is the class name).
SYNTHETIC_TEMPLATES = {
    "color": ("a {} shape", "there is a {} object.", "an image with a {} shape", "a small {} shape", "a big {} shape"),
    "shape": ("a {}", "there is a {}.", "an image with a {}", "a small {}", "a big {}"),
    "size": ("a {} shape", "there is a {} object."),
    "position": ("a shape in the {}", "there is an object in the {}."),
}


@dataclasses.dataclass
class Evaluator:
    """A named evaluation: ``run(encode_image, encode_text) -> metrics``, with chance levels for reporting."""

    name: str
    every: int
    run: Callable[[EncodeFn, EncodeFn], dict[str, float]]
    chance: dict[str, float]

    def due(self, step: int, last_step: int) -> bool:
        return step == last_step or (self.every > 0 and step % self.every == 0)


def _retrieval(name: str, options: Any, data_config: Any, tokenizer: Any, batch_size: int, sharding) -> Evaluator:
    source = build_source(data_config, options.get("split", "heldout"))
    arrays = pipeline.make_eval_arrays(source, tokenizer, int(data_config.image_size), mean=data_config.mean,
                                       std=data_config.std, max_examples=options.get("max_examples", None))
    n = len(arrays["image"])

    def run(encode_image, encode_text):
        img = embed_in_batches(encode_image, arrays["image"], batch_size, sharding, jit=False)
        txt = embed_in_batches(encode_text, arrays["tokens"], batch_size, sharding, jit=False)
        return retrieval_metrics(img, txt, np.arange(n))

    chance = {}
    for k in (1, 5, 10):
        chance.update(retrieval_chance(n, n, 1, k))
    return Evaluator(name, int(options.get("every", 0)), run, chance)


def _synthetic_zeroshot(name: str, options: Any, data_config: Any, tokenizer: Any, batch_size: int,
                        sharding) -> Evaluator:
    attribute = options.get("attribute", "color")
    source = synthetic.SyntheticScenes(
        split="heldout", num_examples=int(options.get("num_examples", 1000)), image_size=int(data_config.image_size),
        seed=int(data_config.seed) + 7919, max_objects=1, single_object=True)
    arrays = pipeline.make_eval_arrays(source, tokenizer, int(data_config.image_size), mean=data_config.mean,
                                       std=data_config.std)
    labels = arrays["labels"][attribute]
    classnames = synthetic.attribute_classnames(attribute)
    templates = list(options.get("templates", None) or SYNTHETIC_TEMPLATES[attribute])

    def run(encode_image, encode_text):
        classifier = build_classifier(lambda t: embed_in_batches(encode_text, t, batch_size, sharding, jit=False),
                                      tokenizer, classnames, templates)
        img = embed_in_batches(encode_image, arrays["image"], batch_size, sharding, jit=False)
        return zero_shot_metrics(img, classifier, labels)

    c = len(classnames)
    return Evaluator(name, int(options.get("every", 0)), run,
                     {"top1": 1 / c, "top5": min(5, c) / c, "mean_per_class_recall": 1 / c})


KINDS = {"retrieval": _retrieval, "synthetic_zeroshot": _synthetic_zeroshot}


def build_evaluators(config: Any, tokenizer: Any, sharding=None) -> list[Evaluator]:
    """Builds every evaluator of ``config.evals`` (materialising its data once)."""
    out = []
    for name, options in sorted(config.evals.items()):
        if options.kind not in KINDS:
            raise ValueError(f"evals.{name}.kind={options.kind!r} is unknown; choose one of {sorted(KINDS)}")
        out.append(KINDS[options.kind](name, options, config.data, tokenizer, int(config.eval_batch_size), sharding))
    return out


def report_lines(name: str, metrics: dict[str, float], chance: dict[str, float]) -> list[str]:
    """Human-readable lines, each metric beside its chance level, e.g. ``heldout i2t_R@5 = 34.2% (chance 0.5%)``."""
    lines = []
    for key, value in metrics.items():
        if key in chance:
            lines.append(f"{name} {key} = {100 * value:.1f}% (chance {100 * chance[key]:.1f}%)")
        elif "rank" in key:
            lines.append(f"{name} {key} = {value:.1f}")
    return lines
