"""Evaluation images decoded on demand: PIL decode -> RGB -> shorter side resized + centre crop -> normalised.

An `ImageSet` is N images behind a ``read(i)`` function (a file path, encoded bytes, a PIL image or a pixel
array). Images that cannot be read or decoded are skipped and counted, with a warning, never an exception. Decoded
images are kept at model resolution (uint8) when the whole set fits in ``cache_bytes``, so an evaluator that runs
every few thousand steps decodes its JPEGs once; larger sets (ImageNet at 224 px) are decoded again on each pass,
on a thread pool, one batch ahead of the device.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError

from softalign.data import skips
from softalign.data.pipeline import CLIP_MEAN, CLIP_STD, normalize_images, resize_center
from softalign.evaluation.embedding import embed_batches

DEFAULT_CACHE_BYTES = 2 << 30  # Decoded uint8 images kept in memory per set, at most.


def skip_reason(error: BaseException) -> str:
    """The training pipeline's skip reason (``softalign.data.skips``) for an image that failed to read or decode."""
    if isinstance(error, skips.BadRecord):
        return error.reason
    if isinstance(error, FileNotFoundError):
        return skips.MISSING_IMAGE
    if isinstance(error, Image.DecompressionBombError):
        return skips.DECOMPRESSION_BOMB
    if isinstance(error, UnidentifiedImageError):
        return skips.NOT_AN_IMAGE
    message = str(error).lower()
    if isinstance(error, EOFError) or "truncated" in message or "premature" in message:
        return skips.TRUNCATED_IMAGE
    return skips.BAD_IMAGE


def to_rgb_array(raw: Any) -> np.ndarray:
    """A path, encoded bytes, PIL image or pixel array -> uint8 (H, W, 3). Raises on unreadable input."""
    if isinstance(raw, (str, os.PathLike)):
        with open(raw, "rb") as f:
            raw = f.read()
    if isinstance(raw, (bytes, bytearray, memoryview)):
        if len(raw) == 0:
            raise skips.BadRecord(skips.EMPTY_IMAGE)
        with Image.open(io.BytesIO(bytes(raw))) as pil:
            pil.load()  # Decodes fully now, so a truncated file fails here.
            return np.asarray(pil.convert("RGB"))
    if isinstance(raw, Image.Image):
        return np.asarray(raw.convert("RGB"))
    arr = np.asarray(raw)
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.number) or arr.size == 0:
            raise ValueError(f"cannot read an image from an array of {arr.dtype} {arr.shape}")
        arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or min(arr.shape[:2]) == 0:
        raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    return np.ascontiguousarray(arr[..., :3])


class ImageSet:
    """N images read and decoded on demand, resized and centre-cropped to ``image_size``.

    ``read(i)`` returns anything `to_rgb_array` accepts; ``describe(i)`` names image i in warnings (e.g. its path).
    `batches` yields normalised float32 batches of readable images with their indices; `skipped` counts the
    unreadable ones found so far (all of them once a full pass, or `load_all`, is done), `skip_counts` by reason.
    """

    def __init__(self, num: int, read: Callable[[int], Any], *, image_size: int,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, name: str = "images",
                 describe: Optional[Callable[[int], str]] = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 num_threads: Optional[int] = None):
        self.num = int(num)
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.name = name
        self._read = read
        self._describe = describe or (lambda i: f"#{i}")
        self.num_threads = num_threads or min(8, os.cpu_count() or 1)
        fits = self.num * self.image_size ** 2 * 3 <= cache_bytes
        self._cache = np.zeros((self.num, self.image_size, self.image_size, 3), np.uint8) if fits else None
        self._state = np.zeros(self.num, np.int8)  # 0: not seen, 1: decoded (cached if caching), -1: unreadable.
        self.errors: dict[int, str] = {}
        self.reasons: dict[int, str] = {}  # why image i was left out, as the training pipeline names it
        self._warned = 0

    def __len__(self) -> int:
        return self.num

    @property
    def skipped(self) -> int:
        """Unreadable images found so far."""
        return int(np.sum(self._state < 0))

    @property
    def complete(self) -> bool:
        """Whether every image has been tried once (so `skipped` is final)."""
        return bool(np.all(self._state != 0))

    def mark_unreadable(self, i: int, error: str, reason: str = skips.BAD_IMAGE) -> None:
        """Leaves image i out; ``reason`` is its ``skipped/<reason>`` (e.g. a record whose captions are all bad)."""
        self._state[i] = -1
        self.errors[i] = error
        self.reasons[i] = reason

    def skip_counts(self) -> dict[str, int]:
        """``{'skipped/<reason>': n}`` of the images left out so far."""
        counts: dict[str, int] = {}
        for reason in self.reasons.values():
            counts[f"{skips.SKIPPED}/{reason}"] = counts.get(f"{skips.SKIPPED}/{reason}", 0) + 1
        return counts

    def offer(self, i: int, raw: Any) -> None:
        """Caches image i from `raw` read elsewhere (e.g. a record read for its label); no-op without a cache."""
        if self._cache is not None and self._state[i] == 0:
            self._store(i, self._decode_raw(i, raw))

    def _decode_raw(self, i: int, raw: Any) -> Optional[np.ndarray]:
        try:
            return resize_center(to_rgb_array(raw), self.image_size)
        except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this image", never a crash.
            self.mark_unreadable(i, f"{type(e).__name__}: {e}", skip_reason(e))
            return None

    def _load(self, i: int) -> Optional[np.ndarray]:
        """Image i at model resolution, or None if unreadable (thread-safe: each i touches only its own row)."""
        if self._state[i] < 0:
            return None
        if self._state[i] > 0 and self._cache is not None:
            return self._cache[i]
        try:
            raw = self._read(i)
        except Exception as e:  # noqa: BLE001 - a missing file or a failing reader skips the image.
            self.mark_unreadable(i, f"{type(e).__name__}: {e}", skip_reason(e))
            return None
        return self._store(i, self._decode_raw(i, raw))

    def _store(self, i: int, image: Optional[np.ndarray]) -> Optional[np.ndarray]:
        if image is not None:
            if self._cache is not None:
                self._cache[i] = image
            self._state[i] = 1
        return image

    def _warn_new_skips(self) -> None:
        if self.skipped > self._warned:
            bad = sorted(self.errors)
            examples = "; ".join(f"{self._describe(i)}: {self.errors[i]}" for i in bad[:3])
            logging.warning("%s: skipped %d unreadable image(s) of %d (e.g. %s)", self.name, len(bad), self.num,
                            examples)
            self._warned = self.skipped

    def load_all(self) -> None:
        """Decodes every image once (filling the cache if there is one), so `skipped` is final."""
        for _ in self._chunks(max(64, 4 * self.num_threads), decode_only=True):
            pass

    def readable_indices(self) -> np.ndarray:
        """Indices of the images not (yet) found unreadable."""
        return np.flatnonzero(self._state >= 0)

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yields (float32 (b, S, S, 3) normalised images, int64 (b,) indices), b == batch_size except the last."""
        if self._cache is not None and self.complete:  # Fast path: everything decoded, slice the cache.
            good = self.readable_indices()
            for start in range(0, len(good), batch_size):
                idx = good[start:start + batch_size]
                yield normalize_images(self._cache[idx], self.mean, self.std), idx
            return
        images: list[np.ndarray] = []
        indices: list[int] = []
        for chunk_images, chunk_indices in self._chunks(batch_size):
            images.extend(chunk_images)
            indices.extend(chunk_indices)
            while len(images) >= batch_size:
                yield self._normalised(images[:batch_size]), np.asarray(indices[:batch_size], np.int64)
                images, indices = images[batch_size:], indices[batch_size:]
        if images:
            yield self._normalised(images), np.asarray(indices, np.int64)

    def _normalised(self, images: list[np.ndarray]) -> np.ndarray:
        return normalize_images(np.stack(images), self.mean, self.std)

    def _chunks(self, size: int, decode_only: bool = False) -> Iterator[tuple[list[np.ndarray], list[int]]]:
        """Decodes the images in chunks of `size` on a thread pool, one chunk ahead; yields the readable ones."""
        todo = np.flatnonzero(self._state == 0) if decode_only else self.readable_indices()
        chunks = [todo[s:s + size] for s in range(0, len(todo), size)]
        with concurrent.futures.ThreadPoolExecutor(self.num_threads) as pool:
            submit = lambda c: [pool.submit(self._load, int(i)) for i in c]
            ahead = submit(chunks[0]) if chunks else []
            for k, chunk in enumerate(chunks):
                current, ahead = ahead, (submit(chunks[k + 1]) if k + 1 < len(chunks) else [])
                results = [f.result() for f in current]
                yield ([im for im in results if im is not None],
                       [int(i) for i, im in zip(chunk, results) if im is not None])
        self._warn_new_skips()


def embed_images(encode_image: Callable, images: ImageSet, batch_size: int, sharding=None, *,
                 progress: Optional[Callable[[int, int], None]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Embeds every readable image of `images` in padded fixed-size batches (one compilation).

    Returns (embeddings (M, D), the M image indices they belong to); unreadable images are left out.
    ``progress(images_done, total_images)`` is called after each batch. `encode_image` must already be compiled
    (e.g. ``functools.partial(jitted_apply, params)``).
    """
    kept: list[np.ndarray] = []

    def stream():
        for batch, idx in images.batches(batch_size):
            kept.append(idx)
            yield batch

    on_batch = None if progress is None else (lambda done, rows: progress(rows, len(images)))
    emb = embed_batches(encode_image, stream(), batch_size, sharding, jit=False, on_batch=on_batch)
    if emb is None:
        raise ValueError(f"{images.name}: none of the {len(images)} images could be read "
                         f"(e.g. {next(iter(images.errors.values()), 'empty set')}).")
    if progress is not None:
        progress(len(images), len(images))
    return emb, np.concatenate(kept)
