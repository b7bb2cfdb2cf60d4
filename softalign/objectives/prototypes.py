"""ProtoCLIP's host side: k-means prototypes of the memory bank, re-clustered every episode, as batch fields.

Every ``objective.episode_steps`` steps the train loop's hook clusters the bank's image embeddings and, apart, its
text embeddings (faiss k-means; every record seen so far, the bank holds each one's latest student embeddings),
then back-translates (ProtoCLIP's PBT): the image-space centroid of text cluster c is the mean image embedding of
the records whose *text* is in c, and vice versa. All centroids are L2-normalised (an empty cluster stays zero).
Before each step the hook adds the batch's cluster labels (-1: the record was not seen at the last clustering)
and the four centroid matrices; the loss is in ``protoclip.py``. The prototypes, labels and the step they were
clustered at are checkpointed with the bank (`PrototypeHook.state_dict`), so a resumed run uses the episode's
prototypes until the next boundary, exactly as an uninterrupted run does.
"""

from __future__ import annotations

import time
from typing import Any

import faiss
import numpy as np
from absl import logging

# Batch fields the hook adds and the protoclip objective reads.
IMAGE_LABEL, TEXT_LABEL = "proto_image_label", "proto_text_label"  # (B,) int32 cluster of the image / the text
IMAGE_CENTROIDS, TEXT_CENTROIDS = "proto_image_centroids", "proto_text_centroids"  # (K, D) C_img, C_txt
IMAGE_FROM_TEXT, TEXT_FROM_IMAGE = "proto_image_from_text", "proto_text_from_image"  # (K, D) C_img<-txt, C_txt<-img
CENTROID_FIELDS = (IMAGE_CENTROIDS, TEXT_CENTROIDS, IMAGE_FROM_TEXT, TEXT_FROM_IMAGE)
STATE_PREFIX = "proto_"  # their checkpointed copies sit beside the memory bank's arrays


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Unit-norm float32 rows; an all-zero row stays zero."""
    x = np.asarray(x, np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(norm > 0, x / np.maximum(norm, 1e-12), 0.0).astype(np.float32)


def kmeans(x: np.ndarray, k: int, iters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss k-means (Euclidean, as ProtoCLIP) of ``x`` (N, D): ``(centroids (k, D) float32, labels (N,) int32)``."""
    x = np.ascontiguousarray(x, np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, verbose=False,
                      max_points_per_centroid=max(256, -(-x.shape[0] // k)))  # no subsampling of the bank
    km.train(x)
    _, labels = km.index.search(x, 1)
    return np.asarray(km.centroids, np.float32), labels.reshape(-1).astype(np.int32)


def back_translate(features: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(k, D) mean of ``features`` per cluster of ``labels`` (ProtoCLIP's PBT); zero for an empty cluster."""
    features = np.asarray(features, np.float64)
    sums = np.zeros((k, features.shape[1]), np.float64)
    order = np.argsort(labels, kind="stable")
    present, starts = np.unique(labels[order], return_index=True)
    if present.size:
        sums[present] = np.add.reduceat(features[order], starts, axis=0)
    counts = np.bincount(labels, minlength=k).astype(np.float64)
    return (sums / np.maximum(counts, 1.0)[:, None]).astype(np.float32)


def cluster(image: np.ndarray, text: np.ndarray, k: int, iters: int, seed: int) -> dict[str, np.ndarray]:
    """Both spaces' prototypes and the back-translated ones, normalised, plus each row's two labels."""
    c_img, y_img = kmeans(image, k, iters, seed)
    c_txt, y_txt = kmeans(text, k, iters, seed + 1)
    return {IMAGE_CENTROIDS: normalize_rows(c_img), TEXT_CENTROIDS: normalize_rows(c_txt),
            IMAGE_FROM_TEXT: normalize_rows(back_translate(image, y_txt, k)),
            TEXT_FROM_IMAGE: normalize_rows(back_translate(text, y_img, k)),
            IMAGE_LABEL: y_img, TEXT_LABEL: y_txt}


class PrototypeHook:
    """Re-clusters ``bank`` (a ``MemoryBank``) every ``episode_steps`` and adds the prototype fields to batches.

    Each process passes its slice of the (K, D) centroids, the batch-sharded layout of a (K, D) global array,
    so K must be a multiple of the data shards (the objective checks). Every process holds the same bank and
    clusters it with the same seed.
    """

    def __init__(self, bank: Any, k: int, episode_steps: int, iters: int = 20, seed: int = 0,
                 process_index: int = 0, process_count: int = 1):
        self.bank, self.k, self.episode_steps, self.iters, self.seed = bank, int(k), int(episode_steps), iters, seed
        self.process_index, self.process_count = process_index, process_count
        dim = bank.dim
        self.centroids = {f: np.zeros((self.k, dim), np.float32) for f in CENTROID_FIELDS}
        self.labels = {f: np.full((bank.size,), -1, np.int32) for f in (IMAGE_LABEL, TEXT_LABEL)}
        self.clustered_at: int | None = None
        self._first = True  # the first step of this process (a fresh run, or a resumed one) always clusters

    def recluster(self, step: int) -> None:
        """k-means over every record the bank has seen; fewer than K seen: keep the previous prototypes."""
        seen = np.flatnonzero(self.bank.last_step >= 0)
        if seen.size < self.k:
            return
        started = time.perf_counter()
        out = cluster(self.bank.image[seen].astype(np.float32), self.bank.text[seen].astype(np.float32), self.k,
                      self.iters, self.seed + 2 * step)
        for f in CENTROID_FIELDS:
            self.centroids[f] = out[f]
        for f in (IMAGE_LABEL, TEXT_LABEL):
            self.labels[f] = np.full((self.bank.size,), -1, np.int32)
            self.labels[f][seen] = out[f]
        self.clustered_at = step
        logging.info("protoclip: clustered %d records into %d prototypes at step %d in %.2f s", seen.size, self.k,
                     step, time.perf_counter() - started)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays to checkpoint beside the bank (keys prefixed ``proto_``): centroids, labels, clustered_at."""
        state = {f"{STATE_PREFIX}{f}": v for f, v in {**self.centroids, **self.labels}.items()}
        state[f"{STATE_PREFIX}clustered_at"] = np.asarray(-1 if self.clustered_at is None else self.clustered_at,
                                                          np.int64)
        return state

    def load(self, state: dict[str, np.ndarray]) -> bool:
        """Restores :meth:`state_dict` arrays (the other keys of ``state`` are ignored); False when ``state`` has
        none (a checkpoint from before they were saved: the first step re-clusters). Shapes must match."""
        if f"{STATE_PREFIX}clustered_at" not in state:
            return False
        for f, ref in {**self.centroids, **self.labels}.items():
            value = np.asarray(state[f"{STATE_PREFIX}{f}"])
            if value.shape != ref.shape:
                raise ValueError(f"checkpointed prototypes {f} are {list(value.shape)}, this run expects "
                                 f"{list(ref.shape)} (objective.num_prototypes, model.embed_dim and the train split "
                                 "must not change on resume)")
            ref[...] = value
        at = int(np.asarray(state[f"{STATE_PREFIX}clustered_at"]))
        self.clustered_at = None if at < 0 else at
        self._first = False
        return True

    def before(self, local: dict[str, np.ndarray], step: int) -> dict[str, np.ndarray]:
        """``local`` plus the prototype fields, re-clustering first at an episode boundary (or on resume)."""
        if step % self.episode_steps == 0 or self._first:
            self.recluster(step)
            self._first = False
        idx = np.asarray(local["index"]).astype(np.int64)
        per = self.k // self.process_count
        rows = slice(self.process_index * per, (self.process_index + 1) * per)
        return {**local, **{f: self.labels[f][idx] for f in (IMAGE_LABEL, TEXT_LABEL)},
                **{f: self.centroids[f][rows] for f in CENTROID_FIELDS}}


def hook_for(config: Any, bank: Any, process_index: int = 0, process_count: int = 1) -> PrototypeHook | None:
    """The loop's prototype hook when ``config.objective.name == 'protoclip'`` (over the memory ``bank``), else None."""
    if config.objective.name != "protoclip":
        return None
    o = config.objective
    return PrototypeHook(bank, o.num_prototypes, o.episode_steps, seed=config.seed, process_index=process_index,
                         process_count=process_count)
