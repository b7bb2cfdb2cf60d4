"""An inverted index of caption terms (term -> sorted caption ids), built in parallel over record shards.

Only the terms of the concepts asked about are indexed, so memory grows with their occurrences, not with the
vocabulary. A concept's frequency is the number of captions in which all terms of at least one of its
alternatives occur: the union over alternatives of the intersection of their terms' posting lists.

Records are read in shards (contiguous index ranges) through ``data.sources.build_source`` -- so caption noise and
``train_fraction`` apply as in training -- by worker processes (``concurrent.futures``, spawned: each builds the
source once), with only captions read (``captions_of``: no image is decoded). Captions that training would drop
(empty, whitespace, not UTF-8) are skipped and counted.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import time
from functools import reduce
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from softalign.tools.concepts import Concept, Normalizer, normalizer


@dataclasses.dataclass
class CaptionIndex:
    """Posting lists (sorted int64 caption ids) of the indexed terms, and what was read."""

    postings: dict[str, np.ndarray]
    num_captions: int = 0
    num_records: int = 0
    skipped: int = 0
    seconds: float = 0.0
    workers: int = 1

    def ids(self, concept: Concept) -> np.ndarray:
        """Sorted ids of the captions that contain the concept."""
        empty = np.zeros(0, np.int64)
        per_alt = [reduce(lambda a, b: np.intersect1d(a, b, assume_unique=True),
                          [self.postings.get(t, empty) for t in alt]) for alt in concept.alternatives]
        return reduce(np.union1d, per_alt, empty)

    def frequency(self, concept: Concept) -> int:
        return int(len(self.ids(concept)))


def index_captions(captions: Iterable[str], terms: set[str], normalize: Normalizer, *, batch: int = 2048,
                   offset: int = 0) -> CaptionIndex:
    """Indexes `captions` (ids from `offset`, in order) for `terms` under the rule `normalize`, streaming."""
    lists: dict[str, list[int]] = {t: [] for t in terms}
    count = 0
    chunk: list[str] = []

    def flush() -> None:
        nonlocal count
        for caption_terms in normalize(chunk):
            for term in set(caption_terms).intersection(terms):
                lists[term].append(offset + count)
            count += 1
        chunk.clear()

    for caption in captions:
        chunk.append(caption)
        if len(chunk) >= batch:
            flush()
    flush()
    return CaptionIndex({t: np.asarray(ids, np.int64) for t, ids in lists.items()}, count)


def merge(parts: Sequence[CaptionIndex]) -> CaptionIndex:
    """Shard indices (ids local to each) -> one index, shard k's ids shifted by the captions before it."""
    offsets = np.cumsum([0] + [p.num_captions for p in parts])
    terms = set().union(*(p.postings for p in parts)) if parts else set()
    postings = {t: np.concatenate([p.postings.get(t, np.zeros(0, np.int64)) + o for p, o in zip(parts, offsets)])
                for t in terms}
    return CaptionIndex(postings, int(offsets[-1]), sum(p.num_records for p in parts), sum(p.skipped for p in parts))


# ----------------------------------------------------------------------------- shards, in worker processes

_CACHE: dict[str, Any] = {}
# Measured on the shared 2-core box: Flickr8k's 30k captions take 0.5 s in this process and 7 s with two spawned
# workers; 1M synthetic captions 98 s in this process, 166-192 s with two (the box was loaded by other jobs).
AUTO_PROCESSES_FROM = 200_000


def _cached(key: str, build):
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def _record_captions(source: Any, start: int, stop: int, stats: dict[str, int]):
    from softalign.data import decode, noise
    from softalign.data.skips import BadRecord

    for index in range(start, stop):
        stats["records"] += 1
        try:
            raw = noise.captions_of(source, index)
        except Exception:  # noqa: BLE001 - an unreadable record is skipped, as training skips it
            stats["skipped"] += 1
            continue
        for caption in raw:
            try:
                yield decode.check_caption(caption)
            except BadRecord:
                stats["skipped"] += 1


def index_shard(task: dict[str, Any]) -> CaptionIndex:
    """One shard: records [start, stop) of ``build_source(data, split)`` (caption ids local to the shard)."""
    from softalign.data.sources import build_source

    key = json.dumps([task["data"], task["split"]], sort_keys=True, default=str)
    source = _cached("source:" + key, lambda: build_source(task["data"], task["split"]))
    normalize = _cached(f"rule:{task['mode']}:{task['model']}", lambda: normalizer(task["mode"], task["model"]))
    stats = {"records": 0, "skipped": 0}
    index = index_captions(_record_captions(source, task["start"], task["stop"], stats), set(task["terms"]),
                           normalize)
    index.num_records, index.skipped = stats["records"], stats["skipped"]
    return index


def source_length(data_config: dict[str, Any], split: str) -> int:
    from softalign.data.sources import build_source
    return len(build_source(data_config, split))


def index_source(data_config: dict[str, Any], concepts: Sequence[Concept], *, split: str = "train",
                 mode: str = "token", model: str = "en_core_web_sm", max_records: int = 0, workers: int = 2,
                 shard_size: int = 0, progress: Optional[Any] = None) -> CaptionIndex:
    """Indexes the first `max_records` (0: all) records of the source for the concepts' terms, in shards over
    `workers` processes (1: in this process; 0: one per core from `AUTO_PROCESSES_FROM` records on, since starting
    a worker costs seconds). Shards default to ~4 per worker, at most 100k records each."""
    start_time = time.perf_counter()
    total = source_length(data_config, split)
    total = min(total, max_records) if max_records > 0 else total
    if workers <= 0:
        workers = 1 if total < AUTO_PROCESSES_FROM else max(1, os.cpu_count() or 1)
    shard = shard_size or max(1, min(100_000, -(-total // max(4 * workers, 1))))
    terms = sorted(set().union(*(c.terms for c in concepts)))
    tasks = [dict(data=data_config, split=split, start=s, stop=min(s + shard, total), terms=terms, mode=mode,
                  model=model) for s in range(0, total, shard)]
    if workers <= 1 or len(tasks) == 1:
        parts = []
        for task in tasks:
            parts.append(index_shard(task))
            if progress:
                progress(len(parts), len(tasks))
    else:
        context = multiprocessing.get_context("spawn")  # no fork of a process that has loaded JAX
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            parts = []
            for part in pool.map(index_shard, tasks):  # in order, so ids follow the records
                parts.append(part)
                if progress:
                    progress(len(parts), len(tasks))
    index = merge(parts)
    index.seconds, index.workers = time.perf_counter() - start_time, workers if len(tasks) > 1 else 1
    return index
