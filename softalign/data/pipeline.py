"""Grain input pipeline: source -> shuffle -> repeat -> augment -> shard -> batch+tokenize -> iterator.

Data config keys read here (ml_collections ConfigDict or dict; defaults in brackets):
  source ['synthetic']         registry name, see `softalign.data.sources`
  image_size [32]              output side length in pixels (sources are also rendered at this size)
  train_size [50000]           records in the train split (one epoch)
  heldout_size [1000]          records in the held-out eval split
  seed [0]                     dataset seed (scene generation); the shuffle/augment seed is an argument
  caption_noise [0.0]          fraction of train records whose caption is swapped with another record's
  max_objects [3]              objects per synthetic scene (1..max_objects)
  single_object [False]        synthetic scenes with exactly one object (clean zero-shot labels)
  crop_scale [(0.9, 1.0)]      area range of the random resized crop (no flips: captions name positions)
  crop_ratio [(3/4, 4/3)]      aspect-ratio range of that crop (clipped so the crop fits the image)
  mean, std [CLIP's]           per-channel normalisation of [0, 1] pixels
  num_threads [2]              Grain read threads
  prefetch_buffer_size [4]     batches Grain prepares ahead

The global stream of records is fixed by `seed` alone; process p of P takes stream positions p, p+P, ...,
so the union of the P local batches of step s is exactly the global batch s of a single-process run
(augmentation is keyed by the global position, hence identical too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from softalign.data.sources import build_source
from softalign.data.tokenizer import Tokenizer

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def default_data_config() -> ml_collections.ConfigDict:
    """A data config with every key this package reads, at its default."""
    return ml_collections.ConfigDict(dict(
        source="synthetic", image_size=32, train_size=50_000, heldout_size=1000, seed=0,
        caption_noise=0.0, max_objects=3, crop_scale=(0.9, 1.0), crop_ratio=(3 / 4, 4 / 3),
        mean=CLIP_MEAN, std=CLIP_STD, num_threads=2, prefetch_buffer_size=4))


def _get(data_config: Any, key: str, default: Any) -> Any:
    value = data_config.get(key, default)
    return default if value is None else value


def crop_resize(image: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resample of box=(x0, y0, x1, y1) to uint8 (size, size, 3)."""
    pil = Image.fromarray(np.asarray(image, np.uint8))
    return np.asarray(pil.resize((size, size), Image.BILINEAR, box=box))


class RandomResizedCrop(grain.transforms.RandomMap):
    """Crops a random area fraction in `scale` (aspect ratio in `ratio`) and resizes to `size` (no flips)."""

    def __init__(self, size: int, scale: Sequence[float] = (0.9, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3)):
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = element["image"]
        h, w = image.shape[:2]
        area = h * w * rng.uniform(*self.scale)
        aspect = math.exp(rng.uniform(*self.log_ratio))
        cw = min(math.sqrt(area * aspect), w)
        ch = min(area / cw, h)
        x0, y0 = rng.uniform(0.0, w - cw), rng.uniform(0.0, h - ch)
        return {**element, "image": crop_resize(image, (x0, y0, x0 + cw, y0 + ch), self.size)}


def normalize_images(images: np.ndarray, mean: Sequence[float] = CLIP_MEAN,
                     std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """Pixels in [0, 255] (uint8 or float) -> float32 ((x / 255) - mean) / std."""
    std_arr = np.asarray(std, np.float32)
    scale = 1.0 / (255.0 * std_arr)
    shift = np.asarray(mean, np.float32) / std_arr
    return images.astype(np.float32) * scale - shift


class CollateAndTokenize:
    """Grain batch_fn: stacks+normalises images, tokenizes all captions in one call."""

    def __init__(self, tokenizer: Tokenizer, mean: Sequence[float], std: Sequence[float]):
        self.tokenizer, self.mean, self.std = tokenizer, tuple(mean), tuple(std)

    def __call__(self, elements: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        images = np.stack([e["image"] for e in elements])
        return {
            "image": normalize_images(images, self.mean, self.std),
            "tokens": self.tokenizer.encode_batch([e["caption"] for e in elements]),
            "index": np.array([e["index"] for e in elements], np.int64),
        }


def _derive_seeds(seed: int) -> tuple[int, int]:
    """Two independent 31-bit seeds (shuffle, augmentation) from one."""
    shuffle_seed, augment_seed = np.random.SeedSequence([int(seed), 0x5A11]).generate_state(2)
    return int(shuffle_seed) >> 1, int(augment_seed) >> 1


def make_train_dataset(data_config: Any, tokenizer: Tokenizer, *, global_batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """The infinite MapDataset of this process's batches (see module docstring)."""
    if global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} not divisible by "
                         f"process_count {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    local_batch = global_batch_size // process_count
    source = build_source(data_config, "train")
    if len(source) < global_batch_size:
        raise ValueError(f"train split has {len(source)} records < global batch {global_batch_size}")
    shuffle_seed, augment_seed = _derive_seeds(seed)
    crop = RandomResizedCrop(_get(data_config, "image_size", 32), _get(data_config, "crop_scale", (0.9, 1.0)),
                             _get(data_config, "crop_ratio", (3 / 4, 4 / 3)))
    collate = CollateAndTokenize(tokenizer, _get(data_config, "mean", CLIP_MEAN),
                                 _get(data_config, "std", CLIP_STD))
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed)
    ds = ds.repeat(None, reseed_each_epoch=True)          # epoch e is shuffled with seed + e
    ds = ds.random_map(crop, seed=augment_seed)           # keyed by global stream position
    ds = ds[process_index::process_count]
    return ds.batch(local_batch, drop_remainder=True, batch_fn=collate)


def make_train_iterator(data_config: Any, tokenizer: Tokenizer, *, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """Checkpointable iterator of local batches {'image' f32 (b,H,W,3), 'tokens' i32 (b,L), 'index' i64 (b,)}."""
    ds = make_train_dataset(data_config, tokenizer, global_batch_size=global_batch_size, seed=seed,
                            process_index=process_index, process_count=process_count)
    read_options = grain.ReadOptions(num_threads=int(_get(data_config, "num_threads", 2)),
                                     prefetch_buffer_size=int(_get(data_config, "prefetch_buffer_size", 4)))
    return iter(ds.to_iter_dataset(read_options))


def resize_center(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes the shorter side to `size` and centre-crops to (size, size); no-op when already that size."""
    h, w = image.shape[:2]
    if h == size and w == size:
        return image
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    pil = Image.fromarray(image).resize((nw, nh), Image.BICUBIC)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.asarray(pil)[top:top + size, left:left + size]


def make_eval_arrays(source: Any, tokenizer: Tokenizer, image_size: int, *,
                     mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                     max_examples: int | None = None) -> dict[str, Any]:
    """Materialises a small eval split: {'image' f32 (n,H,W,3), 'tokens' i32 (n,L), 'index' i64 (n,),
    'caption' str (n,), 'labels': {name: i32 (n,)}} (labels only when every record has them)."""
    n = len(source) if max_examples is None else min(len(source), int(max_examples))
    records = [source[i] for i in range(n)]
    images = np.stack([resize_center(r["image"], image_size) for r in records])
    captions = [r["caption"] for r in records]
    out: dict[str, Any] = {
        "image": normalize_images(images, mean, std),
        "tokens": tokenizer.encode_batch(captions),
        "index": np.array([r["index"] for r in records], np.int64),
        "caption": np.array(captions, dtype=np.str_),
    }
    if records and all("labels" in r for r in records):
        out["labels"] = {k: np.array([r["labels"][k] for r in records], np.int32)
                         for k in records[0]["labels"]}
    return out


def make_eval_split(data_config: Any, tokenizer: Tokenizer, split: str = "heldout") -> dict[str, Any]:
    """`make_eval_arrays` on `build_source(data_config, split)` with the config's size and normalisation."""
    return make_eval_arrays(build_source(data_config, split), tokenizer,
                            int(_get(data_config, "image_size", 32)),
                            mean=_get(data_config, "mean", CLIP_MEAN), std=_get(data_config, "std", CLIP_STD))


def to_global_batch(batch: Any, sharding: jax.sharding.Sharding) -> Any:
    """Per-process numpy batch -> global jax.Arrays sharded along the leading (batch) axis."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
