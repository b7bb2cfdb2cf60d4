"""Registry of data sources: ``build_source(data_config, split)`` dispatches on ``data_config.source``.

A builder is ``fn(data_config, split) -> source`` where the source is a Grain random-access data source
(``__len__``, ``__getitem__(i) -> raw record``): ``{'image': uint8 (H, W, 3) or encoded bytes, 'caption': str or
'captions': [str|bytes, ...], 'index': int, ...}``; `softalign.data.decode` validates and decodes it in the Grain
map stage. Backends: 'synthetic' (here), 'arrayrecord', 'webdataset', 'folder', 'tfds' (their own modules, imported
at the end of this file); more plug in with ``@register_source(name)``.

Splits: the pipeline asks for 'train' and evaluators for 'heldout' (or a name of their own); real sources map
'train' -> ``data.train_split`` and 'heldout' -> ``data.heldout_split`` (`resolve_split`). For split 'train',
``data.caption_noise`` > 0 wraps any non-synthetic source in `noise.NoisyCaptions`, and then
``data.train_fraction`` < 1 cuts it to a nested, seeded subset (`subset.TrainSubset`, which re-numbers the records:
``record['index']`` always indexes the returned source).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from absl import logging

from softalign.data import arrayrecord, decode, folder, noise, skips, subset, tfds_source, webdataset  # noqa: F401 (backends register)
from softalign.data.registry import Source, register_source, registered
from softalign.data.skips import BadRecord
from softalign.data.synthetic import SPLITS, SyntheticScenes, caption_corpus


def available_sources() -> list[str]:
    """Names accepted by `data_config.source`."""
    return sorted(registered())


def build_source(data_config: Any, split: str) -> Source:
    """Builds the `split` ('train' or 'heldout') source named by `data_config.source`."""
    name = data_config.get("source", "synthetic")
    if name not in registered():
        raise ValueError(f"unknown data source {name!r}; known sources: {available_sources()}")
    source = registered()[name](data_config, split)
    rate = float(data_config.get("caption_noise", 0.0) or 0.0)
    if split == "train" and rate > 0.0 and name != "synthetic":
        source = noise.NoisyCaptions(source, rate, seed=int(data_config.get("seed", 0) or 0))
        skips.set_gauge("caption_noise/dataset_rate", source.realised_rate)
        logging.info("caption_noise=%g: %.4f of %d training records have a swapped caption", rate,
                     source.realised_rate, len(source))
    if split == "train":
        source = _train_subset(data_config, source)
    return source


def _train_subset(data_config: Any, source: Source) -> Source:
    """`source` cut to the records of ``data.subset_file`` (if set), then to ``data.train_fraction`` of them
    (`subset.TrainSubset`; nested, seeded by data.seed)."""
    if data_config.get("subset_file", ""):
        source = subset.TrainSubset(source, indices=subset.load_subset_file(data_config.get("subset_file"),
                                                                            len(source)))
        logging.info("subset_file: training on %d of the %d records of the train split", len(source),
                     source.full_size)
    value = data_config.get("train_fraction", 1.0)
    fraction = 1.0 if value is None else float(value)
    if fraction == 1.0:
        return source
    source = subset.TrainSubset(source, fraction, seed=int(data_config.get("seed", 0) or 0))
    skips.set_gauge("train_fraction/records", len(source))
    logging.info("train_fraction=%g: training on %d of the %d records of the train split", fraction, len(source),
                 source.full_size)
    return source


def sample_captions(data_config: Any, num: int, split: str = "train") -> list[str]:
    """Up to `num` usable captions from records spread evenly over the split (for fitting a tokenizer)."""
    if data_config.get("source", "synthetic") == "synthetic":
        return caption_corpus(num, seed=int(data_config.get("seed", 0)))
    source = registered()[data_config.get("source")](data_config, split)   # no caption noise here
    if split == "train":
        source = _train_subset(data_config, source)   # the tokenizer sees only the records the run trains on
    n = len(source)
    captions: list[str] = []
    for position in np.linspace(0, n - 1, min(n, max(num, 1))).astype(np.int64):
        for caption in noise.captions_of(source, int(position)):
            try:
                captions.append(decode.check_caption(caption))
            except BadRecord:
                pass
    if len(captions) > num:   # multi-caption records: thin out evenly
        captions = [captions[i] for i in np.linspace(0, len(captions) - 1, num).astype(np.int64)]
    return captions[:num]


@register_source("synthetic")
def _build_synthetic(data_config: Any, split: str) -> SyntheticScenes:
    """Procedural scenes; train_size/heldout_size records. The splits draw from disjoint streams; the held-out one
    is seeded by ``data.heldout_seed`` (-1: ``data.seed``), so a study can keep one held-out set for all its data
    seeds, or tell the two seeds apart by name."""
    sizes = {"train": data_config.get("train_size", 50_000),
             "heldout": data_config.get("heldout_size", 1000)}
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for the synthetic source; known: {sorted(SPLITS)}")
    seed = int(data_config.get("seed", 0))
    heldout_seed = data_config.get("heldout_seed", -1)
    if split == "heldout" and heldout_seed is not None and int(heldout_seed) >= 0:
        seed = int(heldout_seed)
    return SyntheticScenes(
        split=split,
        num_examples=int(sizes[split]),
        image_size=int(data_config.get("image_size", 32)),
        seed=seed,
        max_objects=int(data_config.get("max_objects", 3)),
        caption_noise=float(data_config.get("caption_noise", 0.0)) if split == "train" else 0.0,
        single_object=bool(data_config.get("single_object", False)),
        color_weights=tuple(data_config.get("color_weights", None) or ()) if split == "train" else (),
    )


