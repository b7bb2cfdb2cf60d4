"""Zero-shot classification: a text-embedding classifier from prompt templates, its accuracy metrics, and the
``zeroshot`` evaluator (any classification dataset spec) with its legacy alias ``synthetic_zeroshot``.

Follows open_clip / CLIP_benchmark: class names x templates, normalise each prompt embedding, average over
templates, renormalise; predict by cosine similarity; report top-1, top-5 and mean per-class recall.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import numpy as np

from softalign.evaluation import base
from softalign.evaluation.datasets import load_classification

# Our own prompt wording; "{}" is replaced by the class name.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image showing a {}.",
    "a close-up photo of a {}.",
    "a blurry photo of a {}.",
    "a drawing of a {}.",
    "a scene with a {}.",
    "there is a {} in this image.",
)

# Our own wording for low-resolution object photos (CIFAR-10/100, STL-10).
_SMALL_PHOTO_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a low-resolution photo of a {}.",
    "a small photo of a {}.",
    "a blurry photo of a {}.",
    "a pixelated photo of a {}.",
    "a cropped photo of a {}.",
    "a photo of the {}.",
    "an image of a {}.",
)

# Per-dataset overrides, keyed by dataset name (a spec's ``name``, a TFDS name, an image folder's name, or
# 'synthetic_<attribute>'); anything missing falls back to DEFAULT_TEMPLATES. ``evals.<name>.templates`` in the
# config overrides both.
DATASET_TEMPLATES: dict[str, tuple[str, ...]] = {
    "cifar10": _SMALL_PHOTO_TEMPLATES,
    "cifar100": _SMALL_PHOTO_TEMPLATES,
    "stl10": _SMALL_PHOTO_TEMPLATES,
    # The synthetic scenes' own caption grammar.
    "synthetic_color": ("a {} shape", "there is a {} object.", "an image with a {} shape", "a small {} shape",
                        "a big {} shape"),
    "synthetic_shape": ("a {}", "there is a {}.", "an image with a {}", "a small {}", "a big {}"),
    "synthetic_size": ("a {} shape", "there is a {} object."),
    "synthetic_position": ("a shape in the {}", "there is an object in the {}."),
    "synthetic_num_objects": ("{} shapes", "an image with {} shapes"),
}


class TextTokenizer(Protocol):
    """What `build_classifier` needs from a tokenizer (softalign.data.Tokenizer satisfies it)."""

    def encode_batch(self, texts: list[str]) -> np.ndarray: ...


def get_templates(dataset: Optional[str] = None,
                  overrides: Optional[Mapping[str, Sequence[str]]] = None) -> tuple[str, ...]:
    """Templates for `dataset`: `overrides[dataset]`, else `DATASET_TEMPLATES[dataset]`, else the defaults."""
    for table in (overrides or {}, DATASET_TEMPLATES):
        if dataset is not None and dataset in table:
            return tuple(table[dataset])
    return DEFAULT_TEMPLATES


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float32."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def build_classifier(
    encode_text: Callable[[np.ndarray], np.ndarray],
    tokenizer: TextTokenizer,
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> np.ndarray:
    """Zero-shot weights (C, D): per class, mean over templates of normalised prompt embeddings, renormalised.

    `encode_text` (tokens (C, L) -> (C, D)) is called once per template with all C classes, so it compiles once.
    """
    if not classnames or not templates:
        raise ValueError("need at least one class name and one template.")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"templates need a '{{}}' placeholder: {bad}")
    total = None
    for template in templates:
        prompts = [template.replace("{}", name) for name in classnames]
        emb = _l2_normalize(np.asarray(encode_text(tokenizer.encode_batch(prompts))))
        total = emb if total is None else total + emb
    return _l2_normalize(total / len(templates))


def zero_shot_metrics(
    image_emb: np.ndarray,
    classifier: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = (1, 5),
    *,
    chunk_size: int = 4096,
) -> dict[str, float]:
    """Top-k accuracy ('top1', 'top5'; k >= C gives 1.0) and mean per-class recall over the classes present
    in `labels` (balanced accuracy), as fractions in [0, 1]; ties count against the true class."""
    image_emb = np.asarray(image_emb, dtype=np.float32)
    classifier = np.asarray(classifier, dtype=np.float32)
    labels = np.asarray(labels)
    num_classes = classifier.shape[0]
    if labels.shape != (image_emb.shape[0],) or labels.size == 0:
        raise ValueError(f"labels must be a non-empty (N,) array, got {labels.shape} for {image_emb.shape[0]} images.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}).")

    ranks = np.empty(labels.shape[0], dtype=np.int64)  # 1-based rank of the true class.
    for start in range(0, labels.shape[0], chunk_size):
        scores = image_emb[start:start + chunk_size] @ classifier.T
        scores = np.where(np.isnan(scores), -np.inf, scores)  # NaN embeddings count as misses.
        true = np.take_along_axis(scores, labels[start:start + chunk_size, None], axis=1)
        ranks[start:start + chunk_size] = np.count_nonzero(scores >= true, axis=1)  # Includes itself.

    out = {f"top{k}": float(np.mean(ranks <= k)) for k in ks}
    hit = ranks == 1
    present = np.unique(labels)
    recalls = [np.mean(hit[labels == c]) for c in present]
    out["mean_per_class_recall"] = float(np.mean(recalls))
    return out


# ----------------------------------------------------------------------------- evaluators

_OPTIONS = ("dataset", "templates", "ks", "per_class")


def class_recalls(image_emb: np.ndarray, classifier: np.ndarray, labels: np.ndarray,
                  classnames: Sequence[str]) -> dict[str, float]:
    """``{'recall[<class>]': top-1 recall}`` for each class present in `labels` (``per_class: True``)."""
    predicted = np.argmax(np.asarray(image_emb, np.float32) @ np.asarray(classifier, np.float32).T, axis=1)
    return {f"recall[{classnames[c]}]": float(np.mean(predicted[labels == c] == c)) for c in np.unique(labels)}


def _build(name: str, options: dict[str, Any], ctx: base.EvalContext) -> base.Evaluator:
    if options.get("dataset") is None:
        raise base.ConfigError(f"evals.{name}.dataset: a classification dataset spec is required")
    data = load_classification(options["dataset"], ctx.images, where=f"evals.{name}.dataset")
    templates = tuple(options.get("templates") or get_templates(data.templates_key))
    if not templates or any("{}" not in t for t in templates):
        raise base.ConfigError(f"evals.{name}.templates: need at least one template, each with a '{{}}'")
    ks = tuple(int(k) for k in (options.get("ks") or (1, 5)))
    classnames = list(data.classnames)
    per_class = bool(options.get("per_class"))

    def run(encode_image, encode_text):
        encode = lambda tokens: ctx.embed_tokens(encode_text, tokens)
        classifier = build_classifier(encode, ctx.tokenizer, classnames, templates)
        emb, kept = ctx.embed_images(encode_image, data.images, f"{name}: images")
        metrics = zero_shot_metrics(emb, classifier, data.labels[kept], ks)
        if per_class:
            metrics.update(class_recalls(emb, classifier, data.labels[kept], classnames))
        return base.with_skipped(metrics, data.images)

    c = len(classnames)
    chance = {f"top{k}": min(k, c) / c for k in ks}
    chance["mean_per_class_recall"] = 1 / c
    return base.Evaluator(name, base.every_of(options), run, chance, num_images=len(data.images))


@base.register_evaluator("zeroshot")
def build_zeroshot(name: str, options: Any, ctx: base.EvalContext) -> base.Evaluator:
    """``evals.<name> = {kind: 'zeroshot', dataset: {...}, templates: [...] (optional), ks: (1, 5), per_class:
    False}``; ``per_class`` adds each class's top-1 recall as ``recall[<class>]`` (for concept-frequency plots)."""
    return _build(name, base.options_of(name, options, _OPTIONS), ctx)


@base.register_evaluator("synthetic_zeroshot")
def build_synthetic_zeroshot(name: str, options: Any, ctx: base.EvalContext) -> base.Evaluator:
    """Shorthand: zero-shot on single-object synthetic scenes, labelled by ``attribute`` (``num_examples`` of them)."""
    options = base.options_of(name, options, ("attribute", "num_examples", "templates", "ks", "per_class"))
    spec = dict(type="synthetic", attribute=options.pop("attribute", None) or "color",
                num_examples=options.pop("num_examples", None) or 1000)
    return _build(name, dict(options, dataset=spec), ctx)
