"""Image-text retrieval metrics (Recall@K, mean/median rank) as defined by CLIP_benchmark, and the ``retrieval``
evaluator (any caption dataset spec; by default the training source's held-out split).

Several captions per image: an image query is a hit if any of its captions ranks in the top K; a caption query is
a hit if its image ranks in the top K.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from softalign.evaluation import base
from softalign.evaluation.datasets import load_captions


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float32, so scores are cosine similarities."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _best_correct_ranks(
    queries: np.ndarray,
    keys: np.ndarray,
    query_ids: np.ndarray,
    key_ids: np.ndarray,
    chunk_size: int,
) -> np.ndarray:
    """1-based rank of each query's best correct key (key id == query id); ties rank wrong keys first,
    so a collapsed model (all scores equal) gets R@K = 0 rather than a spurious 100%."""
    ranks = np.empty(queries.shape[0], dtype=np.int64)
    for start in range(0, queries.shape[0], chunk_size):
        stop = start + chunk_size
        scores = queries[start:stop] @ keys.T  # (chunk, num_keys), bounded memory.
        scores = np.where(np.isnan(scores), -np.inf, scores)  # NaN embeddings count as misses.
        correct = key_ids[None, :] == query_ids[start:stop, None]
        best = np.where(correct, scores, -np.inf).max(axis=1, keepdims=True)
        ranks[start:stop] = 1 + np.count_nonzero(~correct & (scores >= best), axis=1)
    return ranks


def _summarise(prefix: str, ranks: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """R@K for each K plus mean and median rank, keyed like 'i2t_R@1'."""
    out = {f"{prefix}_R@{k}": float(np.mean(ranks <= k)) for k in ks}
    out[f"{prefix}_mean_rank"] = float(np.mean(ranks))
    out[f"{prefix}_median_rank"] = float(np.median(ranks))
    return out


def retrieval_metrics(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    text_to_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    *,
    chunk_size: int = 512,
) -> dict[str, float]:
    """Both-direction Recall@K (fractions in [0, 1]) and 1-based mean/median rank, from cosine similarity.

    `text_to_image[j]` is caption j's image (each image needs >= 1 caption); scores are computed per query chunk.
    """
    image_emb = _l2_normalize(image_emb)
    text_emb = _l2_normalize(text_emb)
    text_to_image = np.asarray(text_to_image)
    num_images, num_texts = image_emb.shape[0], text_emb.shape[0]
    if image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(f"embedding widths differ: images {image_emb.shape}, texts {text_emb.shape}.")
    if text_to_image.shape != (num_texts,) or not np.issubdtype(text_to_image.dtype, np.integer):
        raise ValueError(f"text_to_image must be an int array of shape ({num_texts},), got "
                         f"{text_to_image.dtype} {text_to_image.shape}.")
    if num_texts and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
        raise ValueError(f"text_to_image values must lie in [0, {num_images}).")
    counts = np.bincount(text_to_image, minlength=num_images)
    if num_images == 0 or np.any(counts == 0):
        raise ValueError(f"every image needs at least one caption; {int(np.sum(counts == 0))} have none.")

    image_ids = np.arange(num_images)
    i2t = _best_correct_ranks(image_emb, text_emb, image_ids, text_to_image, chunk_size)
    t2i = _best_correct_ranks(text_emb, image_emb, text_to_image, image_ids, chunk_size)
    return {**_summarise("i2t", i2t, ks), **_summarise("t2i", t2i, ks)}


def retrieval_chance(num_images: int, num_texts: int, captions_per_image: int, k: int) -> dict[str, float]:
    """Expected R@k of a random ranking, keyed like `retrieval_metrics` ('i2t_R@k', 't2i_R@k'), for
    printing next to real scores: i2t = any of an image's captions in the top k, t2i = its image in the top k."""
    if min(num_images, num_texts, captions_per_image, k) <= 0 or captions_per_image > num_texts:
        raise ValueError("need positive sizes and captions_per_image <= num_texts.")
    miss = 1.0  # P(no correct caption in the top k) = C(T - c, k) / C(T, k).
    for i in range(min(k, num_texts)):
        miss *= max(num_texts - captions_per_image - i, 0) / (num_texts - i)
    return {f"i2t_R@{k}": 1.0 - miss, f"t2i_R@{k}": min(k, num_images) / num_images}


# ----------------------------------------------------------------------------- evaluator


@base.register_evaluator("retrieval")
def build_retrieval(name: str, options: Any, ctx: base.EvalContext) -> base.Evaluator:
    """``evals.<name> = {kind: 'retrieval', dataset: {...}, ks: (1, 5, 10)}``. Without ``dataset``: the training
    source's ``split`` ['heldout'] (a random subset of ``max_examples`` records; all by default)."""
    options = base.options_of(name, options, ("dataset", "split", "max_examples", "ks"))
    spec = options.get("dataset")
    if spec is None:
        spec = dict(type="source", split=options.get("split") or "heldout", max_examples=options.get("max_examples"))
    elif options.get("split") or options.get("max_examples"):
        raise base.ConfigError(f"evals.{name}: give split/max_examples inside 'dataset', not next to it")
    data = load_captions(spec, ctx.images, where=f"evals.{name}.dataset")
    tokens = ctx.tokenizer.encode_batch(data.captions)
    ks = tuple(int(k) for k in (options.get("ks") or (1, 5, 10)))

    def chance_of(n: int, t: int) -> dict[str, float]:
        per_image = max(1, min(t, int(round(t / n))))
        return {key: v for k in ks for key, v in retrieval_chance(n, t, per_image, k).items()}

    def run(encode_image, encode_text):
        img, kept = ctx.embed_images(encode_image, data.images, f"{name}: images")
        captions, owners = data.keep_images(kept)
        txt = ctx.embed_tokens(encode_text, tokens[captions], f"{name}: captions")
        chance.clear()  # chance of what was scored: the images that could be read and their captions
        chance.update(chance_of(len(kept), len(captions)))
        return base.with_skipped(retrieval_metrics(img, txt, owners, ks), data.images, data.counts)

    # Before the first run: every image whose captions are usable (the unreadable ones are found while embedding).
    readable = data.images.readable_indices()
    chance = chance_of(max(len(readable), 1), max(len(data.keep_images(readable)[0]), 1))
    return base.Evaluator(name, base.every_of(options), run, chance, num_images=len(data.images))
