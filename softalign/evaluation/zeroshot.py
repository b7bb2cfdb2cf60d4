"""Zero-shot classification: a text-embedding classifier from prompt templates, and its accuracy metrics.

Follows open_clip / CLIP_benchmark: normalise each prompt embedding, average over templates, renormalise.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Protocol, Sequence

import numpy as np

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

# Per-dataset overrides, keyed by dataset name; anything missing falls back to DEFAULT_TEMPLATES.
DATASET_TEMPLATES: dict[str, tuple[str, ...]] = {}


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
