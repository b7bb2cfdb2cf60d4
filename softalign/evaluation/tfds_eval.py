"""TFDS evaluation datasets through ``tfds.data_source`` (ArrayRecord; no TensorFlow needed)."""

from __future__ import annotations

import concurrent.futures
from typing import Any, Optional

import numpy as np

from softalign.config.errors import ConfigError
from softalign.data import skips
from softalign.evaluation.dataset_base import (
    _CLASS_KEYS,
    _COMMON_KEYS,
    CaptionData,
    ClassificationData,
    ImageContext,
    _classnames,
    _image_set,
    _subset,
    add_counts,
    check_keys,
    usable_captions,
)


def _tfds_get(record: Any, key: str) -> Any:
    """record['a/b'] -> record['a']['b'] (nested features such as COCO's captions/text)."""
    for part in key.split("/"):
        record = record[part]
    return record


def _tfds_caption_key(features: Any) -> Optional[str]:
    for key in ("captions/text", "caption", "captions", "text"):
        try:
            _tfds_get(features, key)
            return key
        except (KeyError, TypeError):
            continue
    return None


def _tfds(spec: dict[str, Any], ctx: ImageContext, where: str, task: str) -> Any:
    check_keys(where, spec, _COMMON_KEYS + _CLASS_KEYS + ("split", "data_dir", "download", "image_key",
                                                           "label_key", "caption_key"))
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ConfigError(f"{where}: type 'tfds' needs tensorflow-datasets (pip install tensorflow-datasets)") from None
    if not spec.get("name"):
        raise ConfigError(f"{where}.name: the TFDS dataset name (e.g. 'cifar10') is required")
    tfds_name, split = spec["name"], spec.get("split") or "test"
    try:
        source = tfds.data_source(tfds_name, split=split, data_dir=spec.get("data_dir") or None,
                                  download=bool(spec.get("download", False)))
    except Exception as e:  # noqa: BLE001 - TFDS raises many kinds; the message is what the user needs.
        raise ConfigError(f"{where}: tfds.data_source({tfds_name!r}, split={split!r}) failed: "
                          f"{type(e).__name__}: {e}") from None
    info = getattr(source, "dataset_info", None) or tfds.builder(tfds_name, data_dir=spec.get("data_dir") or None).info
    features = info.features
    image_key = spec.get("image_key") or "image"
    if image_key not in features:
        raise ConfigError(f"{where}.image_key={image_key!r} is not a feature of {tfds_name} ({list(features)})")

    if task == "classification":
        label_key = spec.get("label_key")
        if not label_key:
            labelled = [k for k in features if isinstance(features[k], tfds.features.ClassLabel)]
            label_key = "label" if "label" in labelled else (labelled[0] if labelled else None)
        if not label_key or not isinstance(features[label_key], tfds.features.ClassLabel):
            raise ConfigError(f"{where}: {tfds_name} has no ClassLabel feature to classify (set label_key)")
        target = lambda rec: int(np.asarray(rec[label_key]))
    else:
        caption_key = spec.get("caption_key") or _tfds_caption_key(features)
        if not caption_key:
            raise ConfigError(f"{where}: {tfds_name} has no caption feature (set caption_key)")
        target = lambda rec: _tfds_get(rec, caption_key)  # raw: checked below, as training checks captions

    keep = _subset(len(source), spec)
    display = spec.get("name") or tfds_name
    name = tfds_name.split("/")[0].split(":")[0]
    images = _image_set(ctx, spec, name, len(keep), lambda i: source[int(keep[i])][image_key],
                        lambda i: f"{display}[{split}][{int(keep[i])}]")
    targets: list[Any] = [None] * len(keep)

    def read_record(i: int) -> None:
        try:
            record = source[int(keep[i])]
            targets[i] = target(record)
        except Exception as e:  # noqa: BLE001 - an unreadable record is skipped like a corrupt image.
            images.mark_unreadable(i, f"{type(e).__name__}: {e}", skips.CORRUPT_RECORD)
            return
        images.offer(i, record[image_key])  # Decoded once here when the set fits in the cache.

    with concurrent.futures.ThreadPoolExecutor(images.num_threads) as pool:
        list(pool.map(read_record, range(len(keep))))
    images._warn_new_skips()

    if task == "classification":
        labels = np.asarray([-1 if t is None else t for t in targets], np.int32)
        return ClassificationData(name, images, labels, _classnames(where, spec, features[label_key].names))
    texts, owner, counts = [], [], {}
    for i, raw in enumerate(targets):
        if raw is None:  # unreadable record, already counted
            continue
        try:
            caps, dropped = usable_captions(raw)
        except skips.BadRecord as e:  # no usable caption: the image cannot be scored; leave it out
            images.mark_unreadable(i, f"no usable caption ({e.reason})", e.reason)
            continue
        add_counts(counts, dropped)
        texts.extend(caps)
        owner.extend([i] * len(caps))
    return CaptionData(name, images, texts, np.asarray(owner, np.int64), counts)


# ----------------------------------------------------------------------------- synthetic / training source
