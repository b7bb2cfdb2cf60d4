"""Evaluation datasets from a spec in the config: ``load_classification(spec, ctx)`` / ``load_captions(spec, ctx)``.

A spec is a dict with a ``type`` and that type's keys (every type also takes ``name``, ``max_examples``,
``subset_seed`` and ``cache_mb``; classification specs also ``classnames`` / ``classnames_file``):

  tfds       name, split ['test'], data_dir, download [False], image_key ['image'],
             label_key [the 'label' ClassLabel, else the first one], caption_key [auto: captions/text, caption, ...]
             -- ``tfds.data_source`` (ArrayRecord, no TensorFlow needed); class names from the ClassLabel feature.
  folder     path: one sub-folder per class (sub-folder name = class name, '_' read as a space), images inside.
  captions   path, or images + captions (+ splits): an image folder, a CSV ``image,caption`` (several rows per image)
             and an optional splits.json ``{"train": [...], "val": [...]}``; split [all images with captions].
             Defaults under path: images/, captions.txt (or captions.csv), splits.json.
  coco       images, annotations: a COCO captions json (``images[].file_name``, ``annotations[].caption``).
  synthetic  the project's procedural scenes: split ['heldout'], num_examples, attribute (classification:
             color | shape | size | position | num_objects), single_object, seed_offset.
  source     the training data source (``config.data``) at split ['heldout'] (retrieval on held-out pairs).

``max_examples`` keeps a seeded random subset of that many images (``subset_seed`` [0]), in the original order.
Images are decoded with PIL, converted to RGB, resized (shorter side) and centre-cropped to the model's image size
and normalised with the data config's mean/std (`softalign.data.pipeline`); unreadable ones are skipped and counted.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Optional, Sequence

import numpy as np
from absl import logging

from softalign.config.errors import ConfigError
from softalign.data import skips, synthetic
from softalign.data.sources import build_source
from softalign.evaluation.dataset_base import (  # noqa: F401  (re-exported)
    _CLASS_KEYS,
    _COMMON_KEYS,
    _SPLIT_NAMES,
    _ZEROSHOT_SEED_OFFSET,
    IMAGE_EXTENSIONS,
    CaptionData,
    ClassificationData,
    ImageContext,
    _classnames,
    _default_name,
    _image_set,
    _require_path,
    _subset,
    add_counts,
    as_dict,
    check_keys,
    clean_classname,
    usable_captions,
)
from softalign.evaluation.tfds_eval import _tfds


def _folder(spec: dict[str, Any], ctx: ImageContext, where: str) -> ClassificationData:
    check_keys(where, spec, _COMMON_KEYS + _CLASS_KEYS + ("path",))
    root = _require_path(where, "path", spec.get("path", ""), directory=True)
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if not classes:
        raise ConfigError(f"{where}.path={root!r} has no class sub-folders")
    files, labels = [], []
    for label, cls in enumerate(classes):
        folder = os.path.join(root, cls)
        for fname in sorted(os.listdir(folder)):
            if fname.lower().endswith(IMAGE_EXTENSIONS):
                files.append(os.path.join(folder, fname))
                labels.append(label)
    if not files:
        raise ConfigError(f"{where}.path={root!r}: no images ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    keep = _subset(len(files), spec)
    files = [files[i] for i in keep]
    name = spec.get("name") or _default_name(root)
    images = _image_set(ctx, spec, name, len(files), files.__getitem__, files.__getitem__)
    return ClassificationData(name, images, np.asarray(labels, np.int32)[keep], _classnames(where, spec, classes))


# ----------------------------------------------------------------------------- captions (CSV / COCO json)


Captions = tuple[dict[str, list[str]], dict[str, dict[str, int]], dict[str, str]]


def _by_image(pairs: Sequence[tuple[str, Any]]) -> Captions:
    """(image, raw caption) pairs -> ({image: [usable captions]}, {image: its dropped_caption counts}, {image: skip
    reason} of the images none of whose captions is usable), checked as training checks captions."""
    raw: dict[str, list[Any]] = {}
    for image, caption in pairs:
        raw.setdefault(image, []).append(caption)
    out: dict[str, list[str]] = {}
    dropped: dict[str, dict[str, int]] = {}
    failed: dict[str, str] = {}
    for image, values in raw.items():
        try:
            out[image], dropped[image] = usable_captions(values)
        except skips.BadRecord as e:
            failed[image] = e.reason
    return out, dropped, failed


def _read_captions_csv(path: str) -> Captions:
    """CSV with a header naming ``image`` and ``caption`` columns (quoted fields allowed) -> `_by_image` of its
    rows. Bytes that are not UTF-8 are kept (surrogate-escaped), so that caption is dropped, not the file."""
    pairs = []
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "image" not in fields or "caption" not in fields:
            raise ConfigError(f"{path}: expected a header with 'image' and 'caption' columns, got {reader.fieldnames}")
        reader.fieldnames = fields
        for row in reader:
            image = (row.get("image") or "").strip()
            if image:
                pairs.append((image, row.get("caption") or ""))
    return _by_image(pairs)


def _caption_data(name: str, ctx: ImageContext, spec: dict[str, Any], image_dir: str, order: Sequence[str],
                  read: Captions) -> CaptionData:
    """The images of ``order`` that have usable captions (a seeded subset with ``max_examples``); those whose
    captions are all unusable are counted as ``skipped/<reason>``, the others' bad captions as dropped."""
    captions, dropped, failed = read
    keep = _subset(len(order), spec)
    chosen = [order[i] for i in keep]
    counts: dict[str, int] = {}
    for f in chosen:
        add_counts(counts, {f"{skips.SKIPPED}/{failed[f]}": 1} if f in failed else dropped.get(f, {}))
    files = [f for f in chosen if f in captions]
    texts, owner = [], []
    for i, f in enumerate(files):
        texts.extend(captions[f])
        owner.extend([i] * len(captions[f]))
    paths = [os.path.join(image_dir, f) for f in files]
    images = _image_set(ctx, spec, name, len(paths), paths.__getitem__, paths.__getitem__)
    return CaptionData(name, images, texts, np.asarray(owner, np.int64), counts)


def _captions(spec: dict[str, Any], ctx: ImageContext, where: str) -> CaptionData:
    check_keys(where, spec, _COMMON_KEYS + ("path", "images", "captions", "splits", "split"))
    root = spec.get("path") or ""
    image_dir = spec.get("images") or os.path.join(root, "images")
    _require_path(where, "images" if spec.get("images") else "path", image_dir, directory=True)
    csv_path = spec.get("captions")
    if not csv_path:
        found = [p for p in (os.path.join(root, "captions.txt"), os.path.join(root, "captions.csv"))
                 if os.path.isfile(p)]
        csv_path = found[0] if found else os.path.join(root, "captions.txt")
    read = _read_captions_csv(_require_path(where, "captions", csv_path, directory=False))
    captions, _, failed = read
    split = spec.get("split") or ""
    order = sorted(set(captions) | set(failed))
    if split:
        splits_path = spec.get("splits") or os.path.join(root, "splits.json")
        with open(_require_path(where, "splits", splits_path, directory=False), encoding="utf-8") as f:
            splits = json.load(f)
        if split not in splits:
            raise ConfigError(f"{where}.split={split!r} is not in {splits_path} (has {sorted(splits)})")
        order = list(splits[split])
    missing = [f for f in order if f not in captions and f not in failed]
    if missing:
        logging.warning("%s: %d image(s) of split %r have no caption in %s and are left out (e.g. %s)",
                        where, len(missing), split, csv_path, missing[0])
        order = [f for f in order if f in captions or f in failed]
    if not any(f in captions for f in order):
        raise ConfigError(f"{where}: no captioned images")
    name = spec.get("name") or (_default_name(root or image_dir) + (f"-{split}" if split else ""))
    return _caption_data(name, ctx, spec, image_dir, order, read)


def _coco(spec: dict[str, Any], ctx: ImageContext, where: str) -> CaptionData:
    check_keys(where, spec, _COMMON_KEYS + ("images", "annotations"))
    image_dir = _require_path(where, "images", spec.get("images", ""), directory=True)
    with open(_require_path(where, "annotations", spec.get("annotations", ""), directory=False),
              encoding="utf-8", errors="surrogateescape") as f:
        coco = json.load(f)
    files = {img["id"]: img["file_name"] for img in coco.get("images", [])}
    pairs = [(files[ann["image_id"]], ann.get("caption")) for ann in coco.get("annotations", [])
             if ann.get("image_id") in files]
    read = _by_image(pairs)
    captions, _, failed = read
    order = [files[i] for i in sorted(files) if files[i] in captions or files[i] in failed]
    if not any(f in captions for f in order):
        raise ConfigError(f"{where}.annotations: no image has a caption")
    name = spec.get("name") or os.path.splitext(os.path.basename(spec["annotations"]))[0]
    return _caption_data(name, ctx, spec, image_dir, order, read)


def _synthetic(spec: dict[str, Any], ctx: ImageContext, where: str, task: str) -> Any:
    check_keys(where, spec, _COMMON_KEYS + _CLASS_KEYS + ("split", "num_examples", "attribute", "single_object",
                                                           "seed_offset", "max_objects"))
    data = ctx.data_config if ctx.data_config is not None else {}
    get = lambda key, default: data.get(key, default) if data.get(key, default) is not None else default
    classify = task == "classification"
    split = spec.get("split") or "heldout"
    num = spec.get("num_examples") or (1000 if classify else int(get("heldout_size", 1000)))
    single = spec.get("single_object")
    single = classify if single is None else bool(single)
    offset = spec.get("seed_offset")
    offset = (_ZEROSHOT_SEED_OFFSET if classify else 0) if offset is None else int(offset)
    max_objects = spec.get("max_objects") or (1 if single else int(get("max_objects", 3)))
    try:
        scenes = synthetic.SyntheticScenes(split=split, num_examples=int(num), image_size=ctx.image_size,
                                           seed=int(get("seed", 0)) + offset, max_objects=int(max_objects),
                                           single_object=single)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    attribute = spec.get("attribute") or "color"
    default_name = f"synthetic_{attribute}" if classify else f"synthetic-{split}"
    data = _from_records(scenes, spec, ctx, where, task, spec.get("name") or default_name, attribute)
    if classify:
        data.templates_key = f"synthetic_{attribute}"
    return data


def _source(spec: dict[str, Any], ctx: ImageContext, where: str, task: str) -> Any:
    check_keys(where, spec, _COMMON_KEYS + _CLASS_KEYS + ("split", "attribute"))
    if ctx.data_config is None:
        raise ConfigError(f"{where}: type 'source' needs the run's data config")
    split = spec.get("split") or "heldout"
    try:
        source = build_source(ctx.data_config, split)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    attribute = spec.get("attribute") or "color"
    return _from_records(source, spec, ctx, where, task, spec.get("name") or split, attribute)


def _from_records(source: Any, spec: dict[str, Any], ctx: ImageContext, where: str, task: str, name: str,
                  attribute: str) -> Any:
    """A (small) record source: records read once; images (arrays or encoded bytes) decoded by the ImageSet;
    the records' captions (``captions`` list or ``caption``) or one attribute label (``labels[attribute]``)."""
    keep = _subset(len(source), spec)
    records: list[Optional[dict[str, Any]]] = []
    errors: dict[int, str] = {}
    for i in keep:
        try:
            record = source[int(i)]
            if record.get("_skip"):  # the source already knows why (e.g. a corrupt record)
                errors[len(records)] = (f"skipped: {record['_skip']}", str(record["_skip"]))
                record = None
        except Exception as e:  # noqa: BLE001 - an unreadable record is skipped like a corrupt image.
            errors[len(records)] = (f"{type(e).__name__}: {e}", skips.CORRUPT_RECORD)
            record = None
        records.append(record)
    images = _image_set(ctx, spec, name, len(records), lambda i: records[i]["image"],
                        lambda i: f"{name}[{int(keep[i])}]")
    for i, (error, reason) in errors.items():
        images.mark_unreadable(i, error, reason)
    if task == "classification":
        try:
            found = synthetic.attribute_classnames(attribute)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        present = [r for r in records if r is not None]
        if not present or any(attribute not in r.get("labels", {}) for r in present):
            raise ConfigError(f"{where}: records have no {attribute!r} label")
        labels = np.asarray([-1 if r is None else r["labels"][attribute] for r in records], np.int32)
        return ClassificationData(name, images, labels, _classnames(where, spec, found))
    texts, owner, counts = [], [], {}
    for i, r in enumerate(records):
        if r is None:
            continue
        raw = r["captions"] if r.get("captions") is not None else r.get("caption")
        try:
            caps, dropped = usable_captions(raw)  # as training: empty, whitespace-only, not UTF-8 are left out
        except skips.BadRecord as e:
            images.mark_unreadable(i, f"no usable caption ({e.reason})", e.reason)
            continue
        add_counts(counts, dropped)
        texts.extend(caps)
        owner.extend([i] * len(caps))
    return CaptionData(name, images, texts, np.asarray(owner, np.int64), counts)


# ----------------------------------------------------------------------------- entry points

# task -> spec type -> loader(spec, ctx, where)
_LOADERS = {
    "classification": {
        "tfds": lambda s, c, w: _tfds(s, c, w, "classification"),
        "folder": _folder,
        "synthetic": lambda s, c, w: _synthetic(s, c, w, "classification"),
        "source": lambda s, c, w: _source(s, c, w, "classification"),
    },
    "captions": {
        "tfds": lambda s, c, w: _tfds(s, c, w, "captions"),
        "captions": _captions,
        "coco": _coco,
        "synthetic": lambda s, c, w: _synthetic(s, c, w, "captions"),
        "source": lambda s, c, w: _source(s, c, w, "captions"),
    },
}
CLASSIFICATION_TYPES = tuple(_LOADERS["classification"])
CAPTION_TYPES = tuple(_LOADERS["captions"])


def _load(task: str, spec: Any, ctx: ImageContext, where: str) -> Any:
    spec = as_dict(spec)
    kind = spec.get("type")
    loaders = _LOADERS[task]
    if kind not in loaders:
        label = "caption" if task == "captions" else task
        raise ConfigError(f"{where}.type={kind!r}: {label} datasets are one of {list(loaders)}")
    return loaders[kind](spec, ctx, where)


def load_classification(spec: Any, ctx: ImageContext, where: str = "dataset") -> ClassificationData:
    """Builds a labelled image set from `spec` (see the module docstring)."""
    data = _load("classification", spec, ctx, where)
    if len(data.labels) == 0:
        raise ConfigError(f"{where}: the dataset is empty")
    return data


def load_captions(spec: Any, ctx: ImageContext, where: str = "dataset") -> CaptionData:
    """Builds an image set with captions from `spec` (see the module docstring)."""
    data = _load("captions", spec, ctx, where)
    if not data.captions:
        raise ConfigError(f"{where}: the dataset has no captions")
    return data
