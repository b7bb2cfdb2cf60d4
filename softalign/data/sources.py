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

import glob
import os
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from absl import logging

from softalign.data.synthetic import SPLITS, SyntheticScenes


class Source(Protocol):
    """What the pipeline and evaluators need from a source."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


SourceBuilder = Callable[[Any, str], Source]
_BUILDERS: dict[str, SourceBuilder] = {}


def register_source(name: str) -> Callable[[SourceBuilder], SourceBuilder]:
    """Decorator registering `fn(data_config, split) -> source` under `name`."""

    def decorator(fn: SourceBuilder) -> SourceBuilder:
        if name in _BUILDERS and _BUILDERS[name] is not fn:
            raise ValueError(f"data source {name!r} is already registered")
        _BUILDERS[name] = fn
        return fn

    return decorator


def available_sources() -> list[str]:
    """Names accepted by `data_config.source`."""
    return sorted(_BUILDERS)


def build_source(data_config: Any, split: str) -> Source:
    """Builds the `split` ('train' or 'heldout') source named by `data_config.source`."""
    name = data_config.get("source", "synthetic")
    if name not in _BUILDERS:
        raise ValueError(f"unknown data source {name!r}; known sources: {available_sources()}")
    source = _BUILDERS[name](data_config, split)
    rate = float(data_config.get("caption_noise", 0.0) or 0.0)
    if split == "train" and rate > 0.0 and name != "synthetic":
        from softalign.data import noise, skips
        source = noise.NoisyCaptions(source, rate, seed=int(data_config.get("seed", 0) or 0))
        skips.set_gauge("caption_noise/dataset_rate", source.realised_rate)
        logging.info("caption_noise=%g: %.4f of %d training records have a swapped caption", rate,
                     source.realised_rate, len(source))
    if split == "train":
        source = _train_subset(data_config, source)
    return source


def _train_subset(data_config: Any, source: Source) -> Source:
    """`source` cut to ``data.train_fraction`` of its records (`subset.TrainSubset`; nested, seeded by data.seed)."""
    value = data_config.get("train_fraction", 1.0)
    fraction = 1.0 if value is None else float(value)
    if fraction == 1.0:
        return source
    from softalign.data import skips, subset
    source = subset.TrainSubset(source, fraction, seed=int(data_config.get("seed", 0) or 0))
    skips.set_gauge("train_fraction/records", len(source))
    logging.info("train_fraction=%g: training on %d of the %d records of the train split", fraction, len(source),
                 source.full_size)
    return source


def resolve_split(data_config: Any, split: str) -> str:
    """The dataset's own split name: 'train' -> data.train_split, 'heldout' -> data.heldout_split, else as given."""
    if split == "train":
        return str(data_config.get("train_split", "train") or "train")
    if split == "heldout":
        return str(data_config.get("heldout_split", "val") or "val")
    return split


def shard_paths(pattern: str, split: str, extension: str, *, train: bool = False) -> list[str]:
    """Shard files of `split` named by `pattern`: a folder (its ``<split>-*<extension>`` files, else the files in
    its ``<split>/`` subfolder, else -- for the train split only -- all its ``*<extension>`` files), a glob, or a
    comma-separated list of these. ``{split}`` in the pattern is replaced by the split name."""
    if not pattern:
        raise ValueError("data.path is empty: set it to the folder (or glob/list) of the dataset's shards")
    files: list[str] = []
    for part in (p.strip() for p in pattern.replace("{split}", split).split(",")):
        if not part:
            continue
        part = os.path.expanduser(part)
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, f"{split}-*{extension}")))
            if not found and os.path.isdir(os.path.join(part, split)):
                found = sorted(glob.glob(os.path.join(part, split, f"*{extension}")))
            if not found and train:
                found = sorted(glob.glob(os.path.join(part, f"*{extension}")))
            files.extend(found)
        elif any(ch in part for ch in "*?["):
            files.extend(sorted(glob.glob(part)))
        elif os.path.exists(part):
            files.append(part)
        else:
            raise ValueError(f"{part}: no such file or folder")
    if not files:
        raise ValueError(f"no {extension} shards for split {split!r} in {pattern!r}")
    return files


def sample_captions(data_config: Any, num: int, split: str = "train") -> list[str]:
    """Up to `num` usable captions from records spread evenly over the split (for fitting a tokenizer)."""
    from softalign.data import decode, noise
    from softalign.data.skips import BadRecord
    if data_config.get("source", "synthetic") == "synthetic":
        from softalign.data.synthetic import caption_corpus
        return caption_corpus(num, seed=int(data_config.get("seed", 0)))
    source = _BUILDERS[data_config.get("source")](data_config, split)   # no caption noise here
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
    """Procedural scenes; train_size/heldout_size records, same seed for both splits (disjoint streams)."""
    sizes = {"train": data_config.get("train_size", 50_000),
             "heldout": data_config.get("heldout_size", 1000)}
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for the synthetic source; known: {sorted(SPLITS)}")
    return SyntheticScenes(
        split=split,
        num_examples=int(sizes[split]),
        image_size=int(data_config.get("image_size", 32)),
        seed=int(data_config.get("seed", 0)),
        max_objects=int(data_config.get("max_objects", 3)),
        caption_noise=float(data_config.get("caption_noise", 0.0)) if split == "train" else 0.0,
        single_object=bool(data_config.get("single_object", False)),
    )


# Backends register themselves on import (kept last: they import `register_source` from this module).
from softalign.data import arrayrecord, folder, tfds_source, webdataset  # noqa: E402,F401
