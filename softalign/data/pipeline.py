"""Grain input pipeline: source -> shuffle -> repeat -> decode+augment -> shard -> [drop bad records] ->
batch+tokenize -> [worker processes] -> count -> iterator.

Data config keys read here (ml_collections ConfigDict or dict; defaults in brackets):
  source ['synthetic']         registry name, see `softalign.data.sources` (synthetic/arrayrecord/webdataset/
                               folder/tfds; docs/data.md)
  path [''], name ['']         where a real source's files are; the TFDS dataset name
  train_split ['train'], heldout_split ['val']   the dataset's split names for 'train' and 'heldout'
  image_field ['image'], caption_field ['caption']   TFDS feature names (captions: comma-separated, '/' nests)
  image_dir ['']               folder source: the images folder when it is not <path>/images
  pixel_limit [64e6]           images with more pixels are skipped as decompression bombs
  image_size [32]              output side length in pixels (synthetic scenes are also rendered at this size)
  train_size [50000]           synthetic: records in the train split (real sources: their own length)
  heldout_size [1000]          synthetic: records in the held-out eval split
  seed [0]                     dataset seed (scenes, caption noise); the shuffle/augment seed is an argument
  heldout_seed [-1]            synthetic: seed of the held-out split's scenes; -1: `seed` (its own stream either way)
  caption_noise [0.0]          fraction of train records whose caption is swapped with another record's
  train_fraction [1.0]         train on a fixed subset of ceil(f*N) of the N train records: a prefix of one
                               permutation seeded by `seed`, so subsets are nested (softalign.data.subset);
                               batch['index'] is then the record's position in that subset, in [0, ceil(f*N))
  max_objects [3]              objects per synthetic scene (1..max_objects)
  single_object [False]        synthetic scenes with exactly one object (clean zero-shot labels)
  crop_scale [(0.9, 1.0)]      area range of the random resized crop (no flips: captions name positions)
  crop_ratio [(3/4, 4/3)]      aspect-ratio range of that crop (clipped so the crop fits the image)
  mean, std [CLIP's]           per-channel normalisation of [0, 1] pixels
  text_embedding_shape [()]   (K, D_in): every record carries K precomputed text embeddings of width D_in
                               (softalign.data.text_embedding), batched as 'text_embedding' float32 (b, K, D_in);
                               records without a usable one are skipped (bad_text_embedding). (): the field is ignored
  num_threads [2]              Grain read threads (JPEG decoding releases the GIL)
  prefetch_buffer_size [4]     records Grain prepares ahead
  num_workers [0]              Grain worker processes (mp_prefetch) that decode and batch; 0: in-process
  batch_prefetch [2]           in-process only: batches a background thread collates (normalise+tokenize) ahead

The global stream of records is fixed by `seed` alone and cut into global batches of B; process p of P takes
the contiguous block [p*B/P, (p+1)*B/P) of every global batch. `to_global_batch` lays process p's rows out at
exactly those rows (the batch axis of `sharding.make_mesh` is process-major), so (without bad records) the
global batch of step s is row for row that of a single-process run (augmentation and the caption choice are
keyed by the global position, hence identical too) -- and so is the loss, which is not permutation-invariant
once PSD picks its subset by row. Bad records (softalign.data.skips) are dropped before batching, so batches stay
full-size and each process fills its batch from its own next block. With num_workers = W > 0, worker w decodes
and batches positions w, w+W, ... of the process's stream: deterministic for a given W (resume with the same W).
"""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from absl import flags

from softalign.data import decode, skips, text_embedding
from softalign.data.decode import crop_resize, image_size, resize_center  # noqa: F401 (re-exported)
from softalign.data.sources import build_source
from softalign.data.tokenizer import Tokenizer

TEXT_EMBEDDING = text_embedding.FIELD
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def default_data_config() -> ml_collections.ConfigDict:
    """A data config with every key this package reads, at its default."""
    return ml_collections.ConfigDict(dict(
        source="synthetic", path="", name="", train_split="train", heldout_split="val",
        image_field="image", caption_field="caption", image_dir="", pixel_limit=decode.DEFAULT_PIXEL_LIMIT,
        image_size=32, train_size=50_000, heldout_size=1000, seed=0, heldout_seed=-1,
        caption_noise=0.0, train_fraction=1.0, max_objects=3, color_weights=(), crop_scale=(0.9, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        mean=CLIP_MEAN, std=CLIP_STD, text_embedding_shape=(), num_threads=2, prefetch_buffer_size=4, num_workers=0,
        batch_prefetch=2))


def _get(data_config: Any, key: str, default: Any) -> Any:
    value = data_config.get(key, default)
    return default if value is None else value


class RandomResizedCrop(grain.transforms.RandomMap):
    """Crops a random area fraction in `scale` (aspect ratio in `ratio`) and resizes to `size` (no flips)."""

    def __init__(self, size: int, scale: Sequence[float] = (0.9, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3)):
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = element["image"]             # uint8 (H, W, 3) or an RGB PIL image
        w, h = image_size(image)
        area = h * w * rng.uniform(*self.scale)
        aspect = math.exp(rng.uniform(*self.log_ratio))
        cw = min(math.sqrt(area * aspect), w)
        ch = min(area / cw, h)
        x0, y0 = rng.uniform(0.0, w - cw), rng.uniform(0.0, h - ch)
        return {**element, "image": crop_resize(image, (x0, y0, x0 + cw, y0 + ch), self.size)}


class DecodeAndAugment(grain.transforms.RandomMap):
    """The train map stage: validate + decode (JPEG draft mode) -> random resized crop -> [normalise] -> pick one
    caption. With `mean`/`std` the image comes out normalised float32 (done here, in Grain's parallel read
    threads, rather than in the batch function); without, uint8.

    Returns a `skips.Skipped` marker for a bad record. A multi-caption record yields one caption per step, drawn
    with the crop's per-position rng: it changes from epoch to epoch and is reproducible from the seed."""

    def __init__(self, size: int, scale: Sequence[float] = (0.9, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 pixel_limit: int = decode.DEFAULT_PIXEL_LIMIT, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, text_embedding_shape: Sequence[int] = ()):
        self.crop = RandomResizedCrop(size, scale, ratio)
        self.text_embedding_shape = tuple(int(s) for s in text_embedding_shape)
        self.min_size = decode.draft_size(size, scale[0])
        self.pixel_limit = int(pixel_limit)
        self.mean = None if mean is None else tuple(mean)
        self.std = None if std is None else tuple(std)

    def random_map(self, record: Any, rng: np.random.Generator) -> Any:
        if isinstance(record, skips.Skipped):
            return record
        element = decode.prepare(record, min_size=self.min_size, pixel_limit=self.pixel_limit,
                                 text_embedding_shape=self.text_embedding_shape)
        if isinstance(element, skips.Skipped):
            return element
        element = self.crop.random_map(element, rng)
        if self.mean is not None:
            element["image"] = normalize_images(element["image"], self.mean, self.std)
        captions = element.pop("captions")
        element["caption"] = captions[int(rng.integers(len(captions)))] if len(captions) > 1 else captions[0]
        if "truth" in record:               # synthetic ground truth (softalign.data.scene_truth), batched as is
            element["truth"] = record["truth"]
        return element


def normalize_images(images: np.ndarray, mean: Sequence[float] = CLIP_MEAN,
                     std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """Pixels in [0, 255] (uint8 or float) -> float32 ((x / 255) - mean) / std."""
    std_arr = np.asarray(std, np.float32)
    scale = 1.0 / (255.0 * std_arr)
    shift = np.asarray(mean, np.float32) / std_arr
    out = np.asarray(images).astype(np.float32)   # one new array, then in place: half the memory traffic
    out *= scale
    out -= shift
    return out


class CollateAndTokenize:
    """Grain batch_fn: stacks images (normalising uint8 ones; float32 ones are already normalised), tokenizes all
    captions in one call. The batch carries its skip and caption-noise counts in ``'_stats'`` until
    `skips.StatsSink` takes them out (last pipeline stage). Synthetic records' ground truth is stacked into the
    batch as the `scene_truth.FIELDS` entries."""

    def __init__(self, tokenizer: Tokenizer, mean: Sequence[float], std: Sequence[float]):
        self.tokenizer, self.mean, self.std = tokenizer, tuple(mean), tuple(std)

    def __call__(self, elements: Sequence[dict[str, Any]]) -> dict[str, Any]:
        images = np.stack([e["image"] for e in elements])
        return {
            "image": images if images.dtype == np.float32 else normalize_images(images, self.mean, self.std),
            "tokens": self.tokenizer.encode_batch([e["caption"] for e in elements]),
            "index": np.array([e["index"] for e in elements], np.int64),
            **{k: np.stack([e["truth"][k] for e in elements]) for k in elements[0].get("truth", {})},
            **({TEXT_EMBEDDING: np.stack([e[TEXT_EMBEDDING] for e in elements])}
               if TEXT_EMBEDDING in elements[0] else {}),
            skips.STATS_KEY: skips.batch_stats(list(elements)),
        }


def _derive_seeds(seed: int) -> tuple[int, int]:
    """Two independent 31-bit seeds (shuffle, augmentation) from one."""
    shuffle_seed, augment_seed = np.random.SeedSequence([int(seed), 0x5A11]).generate_state(2)
    return int(shuffle_seed) >> 1, int(augment_seed) >> 1


class ProcessBlocks(grain.MapDataset):
    """Process `process_index`'s rows of each global batch: local position k is global position
    (k // b) * B + process_index * b + k % b, with b = B / process_count."""

    def __init__(self, parent: grain.MapDataset, global_batch_size: int, process_index: int, process_count: int):
        super().__init__(parent)
        self._global, self._local = int(global_batch_size), int(global_batch_size) // int(process_count)
        self._offset = int(process_index) * self._local

    def __len__(self) -> int:
        return len(self._parent) // self._global * self._local

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.slice(index)
        step, row = divmod(int(index), self._local)
        return self._parent[step * self._global + self._offset + row]

    def __str__(self) -> str:
        return f"ProcessBlocks(global={self._global}, local={self._local}, offset={self._offset})"


def make_train_dataset(data_config: Any, tokenizer: Tokenizer, *, global_batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """The infinite IterDataset of this process's batches (see module docstring)."""
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} not divisible by "
                         f"process_count {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    local_batch = global_batch_size // process_count
    source = build_source(data_config, "train")
    if len(source) < global_batch_size:
        fraction = float(_get(data_config, "train_fraction", 1.0))
        cut = f" (data.train_fraction={fraction:g})" if fraction < 1.0 else ""
        raise ValueError(f"train split has {len(source)} records{cut} < global batch {global_batch_size}")
    shuffle_seed, augment_seed = _derive_seeds(seed)
    augment = DecodeAndAugment(_get(data_config, "image_size", 32), _get(data_config, "crop_scale", (0.9, 1.0)),
                               _get(data_config, "crop_ratio", (3 / 4, 4 / 3)),
                               _get(data_config, "pixel_limit", decode.DEFAULT_PIXEL_LIMIT),
                               _get(data_config, "mean", CLIP_MEAN), _get(data_config, "std", CLIP_STD),
                               _get(data_config, "text_embedding_shape", ()))
    collate = CollateAndTokenize(tokenizer, _get(data_config, "mean", CLIP_MEAN),
                                 _get(data_config, "std", CLIP_STD))
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed)
    ds = ds.repeat(None, reseed_each_epoch=True)          # epoch e is shuffled with seed + e
    ds = ds.random_map(augment, seed=augment_seed)        # keyed by global stream position
    ds = ProcessBlocks(ds, global_batch_size, process_index, process_count)   # this process's rows
    read_options = grain.ReadOptions(num_threads=int(_get(data_config, "num_threads", 2)),
                                     prefetch_buffer_size=int(_get(data_config, "prefetch_buffer_size", 4)))
    it = skips.SkipBadIterDataset(ds.to_iter_dataset(read_options))   # before batching: batches stay full
    it = it.batch(local_batch, drop_remainder=True, batch_fn=collate)
    num_workers = int(_get(data_config, "num_workers", 0))
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():     # Grain's workers read absl flags; outside an absl app use defaults
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    elif int(_get(data_config, "batch_prefetch", 2)) > 0:   # collate off the train loop's thread
        it = grain.experimental.ThreadPrefetchIterDataset(
            it, prefetch_buffer_size=int(_get(data_config, "batch_prefetch", 2)))
    return it.map(skips.StatsSink())                      # runs in this process: counts reach data_metrics()


def make_train_iterator(data_config: Any, tokenizer: Tokenizer, *, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """Checkpointable iterator of local batches {'image' f32 (b,H,W,3), 'tokens' i32 (b,L), 'index' i64 (b,)}
    (the synthetic source adds its ground truth: `scene_truth.FIELDS`; data.text_embedding_shape (K, D_in) adds
    'text_embedding' f32 (b, K, D_in))."""
    return iter(make_train_dataset(data_config, tokenizer, global_batch_size=global_batch_size, seed=seed,
                                   process_index=process_index, process_count=process_count))


def data_metrics() -> dict[str, float]:
    """This process's ``data/skipped/<reason>`` and ``data/dropped_caption/<reason>`` counts and the realised
    ``data/caption_noise/realised`` rate (see softalign.data.skips), ready for ``writer.write_scalars``."""
    return skips.data_metrics()


def make_eval_arrays(source: Any, tokenizer: Tokenizer, image_size: int, *,
                     mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                     max_examples: int | None = None, pixel_limit: int = decode.DEFAULT_PIXEL_LIMIT,
                     num_threads: int = 4, text_embedding_shape: Sequence[int] = ()) -> dict[str, Any]:
    """Materialises a small eval split (shorter side resized to `image_size`, centre crop; first usable caption):
    {'image' f32 (n,H,W,3), 'tokens' i32 (n,L), 'index' i64 (n,), 'caption' str (n,), 'labels': {name: i32 (n,)},
    'text_embedding' f32 (n,K,D_in)} (labels only when every record has them; text_embedding with a
    `text_embedding_shape`). Bad records among the first `max_examples` are skipped and counted."""
    n = len(source) if max_examples is None else min(len(source), int(max_examples))

    def load(i: int) -> Any:
        element = decode.prepare(source[i], min_size=image_size, pixel_limit=pixel_limit,
                                 text_embedding_shape=text_embedding_shape)
        if not isinstance(element, skips.Skipped):
            element["image"] = resize_center(element["image"], image_size)
        return element

    if num_threads > 1 and n > 64:
        with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
            loaded = list(pool.map(load, range(n)))
    else:
        loaded = [load(i) for i in range(n)]
    records = []
    for element in loaded:
        if isinstance(element, skips.Skipped):
            skips.count(element.reason)
        else:
            skips.add_counts(element.get(skips.ELEMENT_KEY, {}))
            records.append(element)
    if not records:
        raise ValueError(f"no usable records among the first {n} of {source!r}")
    captions = [r["captions"][0] for r in records]
    out: dict[str, Any] = {
        "image": normalize_images(np.stack([r["image"] for r in records]), mean, std),
        "tokens": tokenizer.encode_batch(captions),
        "index": np.array([r["index"] for r in records], np.int64),
        "caption": np.array(captions, dtype=np.str_),
    }
    if len(text_embedding_shape):
        out[TEXT_EMBEDDING] = np.stack([r[TEXT_EMBEDDING] for r in records])
    if all("labels" in r for r in records):
        out["labels"] = {k: np.array([r["labels"][k] for r in records], np.int32)
                         for k in records[0]["labels"]}
    return out


def make_eval_split(data_config: Any, tokenizer: Tokenizer, split: str = "heldout") -> dict[str, Any]:
    """`make_eval_arrays` on `build_source(data_config, split)` with the config's size and normalisation."""
    return make_eval_arrays(build_source(data_config, split), tokenizer,
                            int(_get(data_config, "image_size", 32)),
                            mean=_get(data_config, "mean", CLIP_MEAN), std=_get(data_config, "std", CLIP_STD),
                            pixel_limit=int(_get(data_config, "pixel_limit", decode.DEFAULT_PIXEL_LIMIT)),
                            text_embedding_shape=_get(data_config, "text_embedding_shape", ()))


def to_global_batch(batch: Any, sharding: jax.sharding.Sharding) -> Any:
    """Per-process numpy batch -> global jax.Arrays sharded along the leading (batch) axis."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
