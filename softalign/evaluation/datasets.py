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

import concurrent.futures
import csv
import dataclasses
import json
import os
from typing import Any, Callable, Optional, Sequence

import numpy as np
from absl import logging

from softalign.config_checks import ConfigError
from softalign.data import synthetic
from softalign.data.pipeline import CLIP_MEAN, CLIP_STD
from softalign.data.sources import build_source
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

    def keep_images(self, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For images `kept` (ordered indices into `images`): (the caption indices that belong to them,
        each one's position in `kept`), i.e. the retrieval ground truth once unreadable images are left out."""
        position = np.full(len(self.images), -1, np.int64)
        position[kept] = np.arange(len(kept))
        mapped = position[self.text_to_image]
        captions = np.flatnonzero(mapped >= 0)
        return captions, mapped[captions]


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


def _read_captions_csv(path: str) -> dict[str, list[str]]:
    """CSV with a header naming ``image`` and ``caption`` columns (quoted fields allowed) -> {image: [captions]}."""
    out: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]
        if "image" not in fields or "caption" not in fields:
            raise ConfigError(f"{path}: expected a header with 'image' and 'caption' columns, got {reader.fieldnames}")
        reader.fieldnames = fields
        for row in reader:
            image, caption = (row.get("image") or "").strip(), (row.get("caption") or "").strip()
            if image and caption:
                out.setdefault(image, []).append(caption)
    return out


def _caption_data(name: str, ctx: ImageContext, spec: dict[str, Any], image_dir: str, order: Sequence[str],
                  captions: dict[str, list[str]]) -> CaptionData:
    keep = _subset(len(order), spec)
    files = [order[i] for i in keep]
    texts, owner = [], []
    for i, f in enumerate(files):
        texts.extend(captions[f])
        owner.extend([i] * len(captions[f]))
    paths = [os.path.join(image_dir, f) for f in files]
    images = _image_set(ctx, spec, name, len(paths), paths.__getitem__, paths.__getitem__)
    return CaptionData(name, images, texts, np.asarray(owner, np.int64))


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
    captions = _read_captions_csv(_require_path(where, "captions", csv_path, directory=False))
    split = spec.get("split") or ""
    order = sorted(captions)
    if split:
        splits_path = spec.get("splits") or os.path.join(root, "splits.json")
        with open(_require_path(where, "splits", splits_path, directory=False), encoding="utf-8") as f:
            splits = json.load(f)
        if split not in splits:
            raise ConfigError(f"{where}.split={split!r} is not in {splits_path} (has {sorted(splits)})")
        order = list(splits[split])
    missing = [f for f in order if f not in captions]
    if missing:
        logging.warning("%s: %d image(s) of split %r have no caption in %s and are left out (e.g. %s)",
                        where, len(missing), split, csv_path, missing[0])
        order = [f for f in order if f in captions]
    if not order:
        raise ConfigError(f"{where}: no captioned images")
    name = spec.get("name") or (_default_name(root or image_dir) + (f"-{split}" if split else ""))
    return _caption_data(name, ctx, spec, image_dir, order, captions)


def _coco(spec: dict[str, Any], ctx: ImageContext, where: str) -> CaptionData:
    check_keys(where, spec, _COMMON_KEYS + ("images", "annotations"))
    image_dir = _require_path(where, "images", spec.get("images", ""), directory=True)
    with open(_require_path(where, "annotations", spec.get("annotations", ""), directory=False),
              encoding="utf-8") as f:
        coco = json.load(f)
    files = {img["id"]: img["file_name"] for img in coco.get("images", [])}
    captions: dict[str, list[str]] = {}
    for ann in coco.get("annotations", []):
        if ann.get("image_id") in files and str(ann.get("caption", "")).strip():
            captions.setdefault(files[ann["image_id"]], []).append(str(ann["caption"]).strip())
    order = [files[i] for i in sorted(files) if files[i] in captions]
    if not order:
        raise ConfigError(f"{where}.annotations: no image has a caption")
    name = spec.get("name") or os.path.splitext(os.path.basename(spec["annotations"]))[0]
    return _caption_data(name, ctx, spec, image_dir, order, captions)


# ----------------------------------------------------------------------------- TFDS


def _tfds_get(record: Any, key: str) -> Any:
    """record['a/b'] -> record['a']['b'] (nested features such as COCO's captions/text)."""
    for part in key.split("/"):
        record = record[part]
    return record


def _texts(value: Any) -> list[str]:
    values = np.asarray(value, dtype=object).reshape(-1)
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


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
        target = lambda rec: _texts(_tfds_get(rec, caption_key))

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
            images.mark_unreadable(i, f"{type(e).__name__}: {e}")
            return
        images.offer(i, record[image_key])  # Decoded once here when the set fits in the cache.

    with concurrent.futures.ThreadPoolExecutor(images.num_threads) as pool:
        list(pool.map(read_record, range(len(keep))))
    images._warn_new_skips()

    if task == "classification":
        labels = np.asarray([-1 if t is None else t for t in targets], np.int32)
        return ClassificationData(name, images, labels, _classnames(where, spec, features[label_key].names))
    texts, owner = [], []
    for i, caps in enumerate(targets):
        if caps is None or not caps:  # No captions: the image cannot be scored; leave it out.
            if caps is not None:
                images.mark_unreadable(i, "no captions")
            continue
        texts.extend(caps)
        owner.extend([i] * len(caps))
    return CaptionData(name, images, texts, np.asarray(owner, np.int64))


# ----------------------------------------------------------------------------- synthetic / training source


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
            if record.get("_skip"):
                raise ValueError(str(record["_skip"]))
        except Exception as e:  # noqa: BLE001 - an unreadable record is skipped like a corrupt image.
            errors[len(records)] = f"{type(e).__name__}: {e}"
            record = None
        records.append(record)
    images = _image_set(ctx, spec, name, len(records), lambda i: records[i]["image"],
                        lambda i: f"{name}[{int(keep[i])}]")
    for i, error in errors.items():
        images.mark_unreadable(i, error)
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
    texts, owner = [], []
    for i, r in enumerate(records):
        caps = [] if r is None else (r.get("captions") or ([r["caption"]] if r.get("caption") else []))
        caps = _texts(caps) if len(caps) else []
        if r is not None and not caps:
            images.mark_unreadable(i, "no captions")
        texts.extend(caps)
        owner.extend([i] * len(caps))
    return CaptionData(name, images, texts, np.asarray(owner, np.int64))


# ----------------------------------------------------------------------------- entry points

CLASSIFICATION_TYPES = ("tfds", "folder", "synthetic", "source")
CAPTION_TYPES = ("tfds", "captions", "coco", "synthetic", "source")


def load_classification(spec: Any, ctx: ImageContext, where: str = "dataset") -> ClassificationData:
    """Builds a labelled image set from `spec` (see the module docstring)."""
    spec = as_dict(spec)
    kind = spec.get("type")
    if kind not in CLASSIFICATION_TYPES:
        raise ConfigError(f"{where}.type={kind!r}: classification datasets are one of {list(CLASSIFICATION_TYPES)}")
    if kind == "folder":
        data = _folder(spec, ctx, where)
    elif kind == "tfds":
        data = _tfds(spec, ctx, where, "classification")
    elif kind == "synthetic":
        data = _synthetic(spec, ctx, where, "classification")
    else:
        data = _source(spec, ctx, where, "classification")
    if len(data.labels) == 0:
        raise ConfigError(f"{where}: the dataset is empty")
    return data


def load_captions(spec: Any, ctx: ImageContext, where: str = "dataset") -> CaptionData:
    """Builds an image set with captions from `spec` (see the module docstring)."""
    spec = as_dict(spec)
    kind = spec.get("type")
    if kind not in CAPTION_TYPES:
        raise ConfigError(f"{where}.type={kind!r}: caption datasets are one of {list(CAPTION_TYPES)}")
    if kind == "captions":
        data = _captions(spec, ctx, where)
    elif kind == "coco":
        data = _coco(spec, ctx, where)
    elif kind == "tfds":
        data = _tfds(spec, ctx, where, "captions")
    elif kind == "synthetic":
        data = _synthetic(spec, ctx, where, "captions")
    else:
        data = _source(spec, ctx, where, "captions")
    if not data.captions:
        raise ConfigError(f"{where}: the dataset has no captions")
    return data
