"""Evaluators that use the synthetic scenes' exact ground truth (``data/scene_truth.py``): many-to-many retrieval
and a compositional probe. Both read the training source's held-out split, so ``data.source`` must be 'synthetic'.

``multi_positive_retrieval``: retrieval where every caption that is true of an image counts (i2t), and every image
a caption is true of (t2i): R@K (a hit if any true item is in the top K), mAP over all true items, and the usual
paired R@K beside them (``paired_*``). With every caption unique the two agree. Their chance levels include the
best query-blind ranking (by popularity), which is high for i2t: generic captions ("there is a small object.")
are true of most scenes, so ranking them first for every image gets i2t R@5 = 100% on the default held-out split.
``i2t_specific_*`` therefore also ranks only the specific captions (true of at most 1% of the images).

``compositional_probe`` (SugarCREPE-style, built from the grammar): for each held-out scene, its true caption
against the same caption with one stated attribute changed to a value that makes it false (checked against the
scene, so "a red circle" never becomes "a blue circle" when the scene also has a blue circle). ``<attr>_top1`` is
how often the true caption scores strictly higher, per attribute; ``mean_top1`` their mean; chance is 0.5.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from absl import logging

from softalign.data import scene_truth, synthetic
from softalign.data.sources import build_source
from softalign.evaluation import base
from softalign.evaluation.images import ImageSet
from softalign.evaluation.retrieval import retrieval_chance, retrieval_metrics

PROBE_ATTRIBUTES = ("color", "shape", "size", "position")
_VALUES = {"color": synthetic.COLORS, "shape": synthetic.SHAPES, "size": synthetic.SIZES,
           "position": synthetic.POSITIONS}


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _scores(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    s = _normalise(queries) @ _normalise(keys).T
    return np.where(np.isnan(s), -np.inf, s)   # NaN embeddings count as misses


def _positive_ranks(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """1-based rank of each row's best positive; ties rank the wrong keys first (as retrieval.py)."""
    best = np.where(positives, scores, -np.inf).max(axis=1, keepdims=True)
    return 1 + np.count_nonzero(~positives & (scores >= best), axis=1)


def _average_precision(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """Per-row AP over all positives; among tied scores the negatives rank first (pessimistic)."""
    order = np.lexsort((positives, -scores), axis=-1)
    hits = np.take_along_axis(positives, order, axis=-1)
    precision = np.cumsum(hits, axis=-1) / np.arange(1, scores.shape[1] + 1)
    return (precision * hits).sum(axis=-1) / np.maximum(hits.sum(axis=-1), 1)


def specific_captions(positives: np.ndarray, fraction: float = 0.01) -> np.ndarray:
    """Captions true of at most ``fraction`` of the images (at least 1): the ones a query-blind ranking cannot
    get right by popularity."""
    return positives.sum(0) <= max(1, int(round(fraction * positives.shape[0])))


def _directions(positives: np.ndarray, specific: np.ndarray | None):
    """(prefix, query rows, key columns, positives) of each reported direction."""
    out = [("i2t", slice(None), slice(None), positives), ("t2i", slice(None), slice(None), positives.T)]
    if specific is not None:
        pos = positives[:, specific]
        rows = pos.any(1)
        out.append(("i2t_specific", rows, specific, pos[rows]))
    return out


def multi_positive_metrics(image_emb: np.ndarray, text_emb: np.ndarray, positives: np.ndarray,
                           ks: Sequence[int] = (1, 5, 10), *, specific: np.ndarray | None = None,
                           chunk_size: int = 512) -> dict[str, float]:
    """``i2t_R@K``/``t2i_R@K`` (any true item in the top K), ``i2t_mAP``/``t2i_mAP`` and the mean number of true
    items per query (``i2t_positives``, ``t2i_positives``); ``positives[i, j]``: caption j is true of image i.
    Every image and every caption needs at least one positive. With a ``specific`` caption mask, also
    ``i2t_specific_*``: image-to-text among those captions only, over the images that have one."""
    positives = np.asarray(positives, bool)
    if positives.shape != (len(image_emb), len(text_emb)):
        raise ValueError(f"positives {positives.shape} != (images, captions) {(len(image_emb), len(text_emb))}")
    if not positives.any(1).all() or not positives.any(0).all():
        raise ValueError("every image and every caption needs at least one positive")
    out: dict[str, float] = {}
    embeddings = {"i2t": (image_emb, text_emb), "t2i": (text_emb, image_emb)}
    for prefix, rows, cols, pos in _directions(positives, specific):
        queries, keys = embeddings[prefix[:3]]
        queries, keys = (queries[rows], keys[cols]) if prefix[:3] == "i2t" else (queries, keys)
        ranks, ap = [], []
        for start in range(0, len(queries), chunk_size):
            s, p = _scores(queries[start:start + chunk_size], keys), pos[start:start + chunk_size]
            ranks.append(_positive_ranks(s, p))
            ap.append(_average_precision(s, p))
        ranks, ap = np.concatenate(ranks), np.concatenate(ap)
        out.update({f"{prefix}_R@{k}": float(np.mean(ranks <= k)) for k in ks})
        out[f"{prefix}_mAP"] = float(np.mean(ap))
        out[f"{prefix}_positives"] = float(pos.sum(1).mean())
    return out


def multi_positive_chance(positives: np.ndarray, ks: Sequence[int],
                          specific: np.ndarray | None = None) -> dict[str, float]:
    """Chance levels of `multi_positive_metrics`: the better of a random ranking (R@K = 1 - C(n - p, K) / C(n, K)
    per query, mAP about p / n) and the best ranking that ignores the query, by popularity (the number of queries
    a key is true of). The second matters: a few captions ("there is a small object.") are true of most scenes,
    so ranking them first for every image scores high i2t R@K without looking at the image."""
    out = {}
    for prefix, _, _, pos in _directions(np.asarray(positives, bool), specific):
        n, p = pos.shape[1], pos.sum(1)
        popular = np.tile(pos.sum(0).astype(np.float32), (len(pos), 1))
        ranks, ap = _positive_ranks(popular, pos), _average_precision(popular, pos)
        for k in ks:
            miss = np.ones(len(p))
            for i in range(min(k, n)):
                miss *= np.maximum(n - p - i, 0) / (n - i)
            out[f"{prefix}_R@{k}"] = float(max(np.mean(1.0 - miss), np.mean(ranks <= k)))
        out[f"{prefix}_mAP"] = float(max(np.mean(p / n), np.mean(ap)))
    return out


def _synthetic_source(name: str, ctx: base.EvalContext, split: str) -> synthetic.SyntheticScenes:
    source_name = ctx.data_config.get("source", "synthetic") if ctx.data_config is not None else None
    if source_name != "synthetic":
        raise base.ConfigError(f"evals.{name}: needs data.source='synthetic' (its ground truth), not {source_name!r}")
    try:
        return build_source(ctx.data_config, split)
    except ValueError as e:
        raise base.ConfigError(f"evals.{name}: {e}") from None


def _images(ctx: base.EvalContext, source: Any, name: str, n: int) -> ImageSet:
    im = ctx.images
    return ImageSet(n, lambda i: source[int(i)]["image"], image_size=im.image_size, mean=im.mean, std=im.std,
                    name=name, num_threads=im.num_threads)


def _count(options: dict[str, Any], key: str, total: int) -> int:
    limit = options.get(key)
    return total if not limit or int(limit) <= 0 else min(total, int(limit))


@base.register_evaluator("multi_positive_retrieval")
def build_multi_positive_retrieval(name: str, options: Any, ctx: base.EvalContext) -> base.Evaluator:
    """``evals.<name> = {kind: 'multi_positive_retrieval', split: 'heldout', max_examples: 0 (all), ks: (1, 5, 10),
    specific_fraction: 0.01}``: the first ``max_examples`` records of the split (its records are i.i.d., so a prefix
    is a random sample); ``i2t_specific_*`` ranks only the captions true of at most that share of the images."""
    options = base.options_of(name, options, ("split", "max_examples", "ks", "specific_fraction"))
    source = _synthetic_source(name, ctx, options.get("split") or "heldout")
    n = _count(options, "max_examples", len(source))
    truth = [source.truth(i) for i in range(n)]
    positives = scene_truth.compatibility(np.stack([t[scene_truth.CAPTION] for t in truth]),
                                          np.stack([t[scene_truth.SCENE] for t in truth]))
    fraction = options.get("specific_fraction")
    specific = specific_captions(positives, 0.01 if fraction is None else float(fraction))
    tokens = ctx.tokenizer.encode_batch([source.caption(i) for i in range(n)])
    images = _images(ctx, source, name, n)
    ks = tuple(int(k) for k in (options.get("ks") or (1, 5, 10)))

    def run(encode_image, encode_text):
        img, kept = ctx.embed_images(encode_image, images, f"{name}: images")
        txt = ctx.embed_tokens(encode_text, tokens[kept], f"{name}: captions")
        out = multi_positive_metrics(img, txt, positives[np.ix_(kept, kept)], ks, specific=specific[kept])
        paired = retrieval_metrics(img, txt, np.arange(len(kept)), ks)
        out.update({f"paired_{k}": v for k, v in paired.items() if "_R@" in k})
        return base.with_skipped(out, images)

    chance = multi_positive_chance(positives, ks, specific)
    for k in ks:
        chance.update({f"paired_{key}": v for key, v in retrieval_chance(n, n, 1, k).items()})
    return base.Evaluator(name, base.every_of(options), run, chance, num_images=n)


def probe_captions(source: Any, index: int, attributes: Sequence[str] = PROBE_ATTRIBUTES,
                   seed: int = 0) -> tuple[str, dict[str, str]]:
    """Record `index`'s clean caption and, per attribute it states, one caption with that attribute changed so
    that it is false of the scene (attributes with no such change are left out)."""
    scene, parts, _ = source.scene_and_parts(index)
    scene_arr = synthetic.scene_array(scene, source.max_objects)
    rng = np.random.default_rng((int(seed), int(index)))
    candidates, specs = [], []                       # (attr, phrase, value) and what the changed caption states
    for attr in attributes:
        a = synthetic.ATTRIBUTES.index(attr)
        for k, phrase in enumerate(parts.phrases):
            for value in range(len(_VALUES[attr])) if phrase.stated[a] >= 0 else ():
                if value != phrase.stated[a]:
                    stated = [list(p.stated) for p in parts.phrases]
                    stated[k][a] = value
                    candidates.append((attr, k, value))
                    specs.append(scene_truth.encode_caption(stated, source.max_objects, parts.count))
    true_of_scene = scene_truth.compatibility(np.stack(specs), scene_arr[None])[0] if specs else np.zeros(0, bool)
    false: dict[str, str] = {}
    for attr in attributes:
        options = [c for c, true in zip(candidates, true_of_scene) if c[0] == attr and not true]
        if options:
            _, k, value = options[int(rng.integers(len(options)))]
            false[attr] = synthetic.restate(parts, k, attr, value, rng).text()
    return parts.text(), false


@base.register_evaluator("compositional_probe")
def build_compositional_probe(name: str, options: Any, ctx: base.EvalContext) -> base.Evaluator:
    """``evals.<name> = {kind: 'compositional_probe', split: 'heldout', num_examples: 0 (all),
    attributes: (color, shape, size, position), seed: 0}``."""
    options = base.options_of(name, options, ("split", "num_examples", "attributes", "seed"))
    attributes = tuple(options.get("attributes") or PROBE_ATTRIBUTES)
    unknown = sorted(set(attributes) - set(PROBE_ATTRIBUTES))
    if unknown:
        raise base.ConfigError(f"evals.{name}.attributes: unknown {unknown}; known: {list(PROBE_ATTRIBUTES)}")
    source = _synthetic_source(name, ctx, options.get("split") or "heldout")
    n = _count(options, "num_examples", len(source))
    true_captions, pairs = [], {a: ([], []) for a in attributes}   # attr -> (record, false caption)
    for i in range(n):
        text, false = probe_captions(source, i, attributes, int(options.get("seed") or 0))
        true_captions.append(text)
        for attr, caption in false.items():
            pairs[attr][0].append(i)
            pairs[attr][1].append(caption)
    logging.info("%s: %d scenes; probe pairs per attribute: %s", name, n,
                 {a: len(p[0]) for a, p in pairs.items()})
    true_tokens = ctx.tokenizer.encode_batch(true_captions)
    false_tokens = {a: ctx.tokenizer.encode_batch(p[1]) for a, p in pairs.items() if p[0]}
    images = _images(ctx, source, name, n)

    def run(encode_image, encode_text):
        img, kept = ctx.embed_images(encode_image, images, f"{name}: images")
        by_record = np.full(n, -1)
        by_record[kept] = np.arange(len(kept))
        img = _normalise(img)
        true = _normalise(ctx.embed_tokens(encode_text, true_tokens[kept]))
        out = {}
        for attr, tokens in false_tokens.items():
            rows = by_record[np.asarray(pairs[attr][0])]
            ok = rows >= 0
            false = _normalise(ctx.embed_tokens(encode_text, tokens[ok]))
            s_true = np.sum(img[rows[ok]] * true[rows[ok]], axis=-1)
            s_false = np.sum(img[rows[ok]] * false, axis=-1)
            out[f"{attr}_top1"] = float(np.mean(np.nan_to_num(s_true, nan=-np.inf) > s_false))
        out["mean_top1"] = float(np.mean(list(out.values()))) if out else 0.0
        return base.with_skipped(out, images)

    chance = {f"{a}_top1": 0.5 for a in false_tokens} | {"mean_top1": 0.5}
    return base.Evaluator(name, base.every_of(options), run, chance, num_images=n)
