"""Registry of data sources: ``build_source(data_config, split)`` dispatches on ``data_config.source``.

A builder is ``fn(data_config, split) -> source`` where the source is a Grain random-access data source
(``__len__``, ``__getitem__(i) -> {'image': uint8 (H, W, 3), 'caption': str, 'index': int, ...}``).
New backends ('arrayrecord', 'tfds', 'webdataset', 'folder', ...) plug in with ``@register_source(name)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

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
    return _BUILDERS[name](data_config, split)


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
