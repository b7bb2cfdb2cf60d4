"""The ``embedding_retrieval`` evaluator: retrieval where the texts are a split's own precomputed text embeddings.

A precomputed-text model (``model.text.kind='precomputed'``) cannot embed caption strings, so it is evaluated on
what it trains on: each record's K ``text_embedding`` facets (``data.text_embedding_shape``) are its K captions.
The metrics and chance levels are the ``retrieval`` evaluator's (an image query hits if any facet ranks in the top K).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from softalign.data import pipeline
from softalign.data.sources import build_source
from softalign.evaluation import base
from softalign.evaluation.embedding import embed_in_batches
from softalign.evaluation.retrieval import retrieval_chance, retrieval_metrics


@base.register_evaluator("embedding_retrieval")
def build_embedding_retrieval(name: str, options: Any, ctx: base.EvalContext) -> base.Evaluator:
    """``evals.<name> = {kind: 'embedding_retrieval', split: 'heldout', max_examples: None, ks: (1, 5, 10)}``."""
    options = base.options_of(name, options, ("split", "max_examples", "ks"))
    data = ctx.data_config
    shape = tuple(data.get("text_embedding_shape", ()) or ())
    if len(shape) != 2:
        raise base.ConfigError(f"evals.{name}: kind 'embedding_retrieval' needs data.text_embedding_shape=(K, D_in)")
    arrays = pipeline.make_eval_arrays(
        build_source(data, options.get("split") or "heldout"), ctx.tokenizer, int(data.get("image_size", 32)),
        mean=data.get("mean", pipeline.CLIP_MEAN), std=data.get("std", pipeline.CLIP_STD),
        max_examples=options.get("max_examples"), text_embedding_shape=shape)
    n, facets = len(arrays["index"]), shape[0]
    texts = arrays[pipeline.TEXT_EMBEDDING].reshape(n * facets, shape[1])
    owners = np.repeat(np.arange(n), facets)
    ks = tuple(int(k) for k in (options.get("ks") or (1, 5, 10)))
    chance = {key: v for k in ks for key, v in retrieval_chance(n, n * facets, facets, k).items()}

    def run(encode_image, encode_text):
        img = embed_in_batches(encode_image, arrays["image"], ctx.batch_size, ctx.sharding, jit=False)
        txt = embed_in_batches(encode_text, texts, ctx.batch_size, ctx.sharding, jit=False)
        return retrieval_metrics(img, txt, owners, ks)

    return base.Evaluator(name, base.every_of(options), run, chance, num_images=n)
