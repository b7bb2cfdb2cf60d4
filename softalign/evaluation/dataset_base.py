"""Shared types and helpers of the evaluation dataset loaders (``datasets.py``, ``tfds_eval.py``)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence

import numpy as np

from softalign.config.errors import ConfigError
from softalign.data import decode, skips
from softalign.data.pipeline import CLIP_MEAN, CLIP_STD
from softalign.evaluation.images import DEFAULT_CACHE_BYTES, ImageSet

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
_COMMON_KEYS = ("type", "name", "max_examples", "subset_seed", "cache_mb")
_CLASS_KEYS = ("classnames", "classnames_file")
_SPLIT_NAMES = ("train", "test", "val", "valid", "validation", "eval", "heldout")
_ZEROSHOT_SEED_OFFSET = 7919  # synthetic zero-shot scenes use their own stream (as the suite always has)


@dataclasses.dataclass
class ImageContext:
    """What loaders need from the run: the model's image size and normalisation, and the data config."""

    image_size: int
    mean: Sequence[float] = CLIP_MEAN
    std: Sequence[float] = CLIP_STD
    data_config: Any = None
    num_threads: Optional[int] = None

    @classmethod
    def from_data_config(cls, data_config: Any) -> "ImageContext":
        return cls(int(data_config.image_size), tuple(data_config.get("mean", None) or CLIP_MEAN),
                   tuple(data_config.get("std", None) or CLIP_STD), data_config)


@dataclasses.dataclass
class ClassificationData:
    """Images with one label each; ``labels[i]`` indexes ``classnames``."""

    name: str
    images: ImageSet
    labels: np.ndarray
    classnames: list[str]
    templates_key: str = ""  # which per-dataset zero-shot templates apply; default: `name`

    def __post_init__(self):
        self.templates_key = self.templates_key or self.name


@dataclasses.dataclass
class CaptionData:
    """Images with one or more captions each; ``text_to_image[j]`` is caption j's image."""

    name: str
    images: ImageSet
    captions: list[str]
    text_to_image: np.ndarray
    # ``dropped_caption/<reason>`` of the kept images' unusable captions, and ``skipped/<reason>`` of images left out
    # before the image set was built (a CSV row's image whose captions are all unusable); `images` counts the rest.
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def keep_images(self, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For images `kept` (ordered indices into `images`): (the caption indices that belong to them,
        each one's position in `kept`), i.e. the retrieval ground truth once unreadable images are left out."""
        position = np.full(len(self.images), -1, np.int64)
        position[kept] = np.arange(len(kept))
        mapped = position[self.text_to_image]
        captions = np.flatnonzero(mapped >= 0)
        return captions, mapped[captions]


def caption_values(value: Any) -> list[Any]:
    """A record's raw caption value(s) as a list: one str/bytes, a list, or an array of them (TFDS)."""
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return list(value.reshape(-1)) if value.ndim else [value.item()]
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def usable_captions(value: Any) -> tuple[list[str], dict[str, int]]:
    """The usable captions (stripped) and ``{'dropped_caption/<reason>': n}`` of the rest, checked exactly as the
    training pipeline checks them (empty, whitespace-only, not UTF-8: `softalign.data.decode.check_caption`).
    Raises ``skips.BadRecord`` (its ``reason``) when none is usable."""
    values = caption_values(value)
    if not values:
        raise skips.BadRecord(skips.MISSING_CAPTION)
    return decode.check_captions(values)


def add_counts(target: dict[str, int], counts: dict[str, int]) -> dict[str, int]:
    """Adds ``counts`` into ``target`` (returned)."""
    return skips.merge_into(target, counts)


def as_dict(spec: Any) -> dict[str, Any]:
    """A plain dict from a ConfigDict / mapping (None -> {})."""
    if spec is None:
        return {}
    if hasattr(spec, "to_dict"):
        return spec.to_dict()
    return dict(spec)


def check_keys(where: str, spec: dict[str, Any], allowed: Sequence[str]) -> None:
    """Raises ConfigError naming any key of `spec` that is not in `allowed` (catches typos)."""
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(allowed)}")


def _require_path(where: str, key: str, path: str, *, directory: bool) -> str:
    ok = os.path.isdir(path) if directory else os.path.isfile(path)
    if not path or not ok:
        kind = "directory" if directory else "file"
        raise ConfigError(f"{where}.{key}={path!r}: no such {kind}")
    return path


def _subset(n: int, spec: dict[str, Any]) -> np.ndarray:
    """Indices of a seeded random subset of ``max_examples`` of n items (all if unset), in increasing order."""
    limit = spec.get("max_examples")
    if limit is None or int(limit) <= 0 or int(limit) >= n:
        return np.arange(n)
    rng = np.random.default_rng(int(spec.get("subset_seed") or 0))
    return np.sort(rng.choice(n, int(limit), replace=False))


def _image_set(ctx: ImageContext, spec: dict[str, Any], name: str, num: int, read: Callable[[int], Any],
               describe: Optional[Callable[[int], str]] = None) -> ImageSet:
    cache_mb = spec.get("cache_mb")
    cache = DEFAULT_CACHE_BYTES if cache_mb is None else int(float(cache_mb) * 2 ** 20)
    return ImageSet(num, read, image_size=ctx.image_size, mean=ctx.mean, std=ctx.std, name=name,
                    describe=describe, cache_bytes=cache, num_threads=ctx.num_threads)


def clean_classname(name: Any) -> str:
    """'tabby_cat' -> 'tabby cat' (bytes decoded, underscores read as spaces)."""
    if isinstance(name, bytes):
        name = name.decode("utf-8")
    return str(name).replace("_", " ").strip()


def _classnames(where: str, spec: dict[str, Any], found: Sequence[str]) -> list[str]:
    """`found` (cleaned), unless the spec gives ``classnames`` or a ``classnames_file`` (one per line)."""
    names: Optional[list[str]] = None
    if spec.get("classnames"):
        names = [str(c) for c in spec["classnames"]]
    elif spec.get("classnames_file"):
        path = _require_path(where, "classnames_file", spec["classnames_file"], directory=False)
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    if names is None:
        return [clean_classname(c) for c in found]
    if len(names) != len(found):
        raise ConfigError(f"{where}: {len(names)} class names given for a dataset with {len(found)} classes")
    return names


def _default_name(path: str) -> str:
    """A dataset name from a folder path: '.../cifar10/test' -> 'cifar10' (split-like leaf names skipped)."""
    parts = [p for p in os.path.normpath(os.path.abspath(path)).split(os.sep) if p]
    while len(parts) > 1 and parts[-1].lower() in _SPLIT_NAMES + ("images",):
        parts.pop()
    return parts[-1].lower() if parts else "dataset"


# ----------------------------------------------------------------------------- image folder
