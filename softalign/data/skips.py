"""Bad-record accounting: records that cannot be used are skipped and counted, never fatal, never silent.

Two kinds of counts, both keyed ``<kind>/<reason>``:
  skipped/<reason>          a whole record (or, for shard-level reasons, a shard) was left out
  dropped_caption/<reason>  one caption of a multi-caption record was unusable; the record kept its others

Where a count is taken:
  * at index time (a source opening its shards): counted once, straight into this process's counter;
  * at read time (decode/validation in the Grain map stage): the map stage returns a `Skipped` marker instead of
    the record. `SkipBadIterDataset` drops markers *before batching* (batches stay full-size) and attaches their
    reasons to the next good element, the batch function sums them into ``batch['_stats']`` and `StatsSink`, the
    last stage (it runs in the training process even when Grain worker processes decode), pops that entry and adds
    it to the counter. So the counts also see skips made inside Grain worker processes. Read-time counts are per
    read: a bad record met in every epoch is counted in every epoch.

`counts()` is this process's running total; `data_metrics()` formats it for the metric writer as
``data/skipped/<reason>``, ``data/dropped_caption/<reason>`` and ``data/caption_noise/realised`` (fraction of
served training records whose caption was swapped by ``data.caption_noise``).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Mapping
from typing import Any

import grain

# Reasons (the suffix of skipped/<reason> and dropped_caption/<reason>).
EMPTY_IMAGE = "empty_image"                  # zero-byte image
TRUNCATED_IMAGE = "truncated_image"          # the encoded image ends early
NOT_AN_IMAGE = "not_an_image"                # bytes no decoder recognises (e.g. HTML saved as .jpg)
DECOMPRESSION_BOMB = "decompression_bomb"    # width*height above data.pixel_limit
BAD_IMAGE = "bad_image"                      # any other decode failure
MISSING_IMAGE = "missing_image"              # no image for the key / file not found
EMPTY_CAPTION = "empty_caption"
WHITESPACE_CAPTION = "whitespace_caption"
CAPTION_NOT_UTF8 = "caption_not_utf8"
MISSING_CAPTION = "missing_caption"          # e.g. a webdataset key without .txt
CORRUPT_RECORD = "corrupt_record"            # an ArrayRecord record that fails its checksum or cannot be parsed
CORRUPT_SHARD = "corrupt_shard"              # an ArrayRecord shard that cannot be opened (unit: shards)
BAD_TEXT_EMBEDDING = "bad_text_embedding"    # a text_embedding that is missing, malformed, non-finite or misshapen
TRUNCATED_SHARD = "truncated_shard"          # records lost at the cut end of a tar shard (>= 1 per cut shard)

SKIPPED, DROPPED_CAPTION = "skipped", "dropped_caption"
STATS_KEY = "_stats"      # batch entry carrying counts from the workers to StatsSink
ELEMENT_KEY = "_skips"    # element entry carrying counts to the batch function
SERVED, SWAPPED = "served", "caption_swapped"


class BadRecord(Exception):
    """Raised by decode/validation helpers; `reason` is one of the constants above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Skipped:
    """What a map stage returns in place of a bad record (picklable: it may come from a worker process)."""

    reason: str
    index: int = -1
    extra: tuple[tuple[str, int], ...] = ()   # dropped_caption counts gathered before the record failed


class _Counter:
    def __init__(self):
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._gauges: dict[str, float] = {}

    def add(self, key: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._counts[key] += int(n)

    def update(self, counts: Mapping[str, int]) -> None:
        with self._lock:
            for key, n in counts.items():
                if n:
                    self._counts[key] += int(n)

    def set_gauge(self, key: str, value: float) -> None:
        with self._lock:
            self._gauges[key] = float(value)

    def snapshot(self) -> tuple[dict[str, int], dict[str, float]]:
        with self._lock:
            return dict(self._counts), dict(self._gauges)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self._gauges.clear()


_COUNTER = _Counter()
_COUNTED_ONCE: set[str] = set()
_ONCE_LOCK = threading.Lock()


def count(reason: str, n: int = 1, kind: str = SKIPPED) -> None:
    """Adds `n` to this process's ``<kind>/<reason>`` count (thread-safe)."""
    _COUNTER.add(f"{kind}/{reason}", n)


def count_once(token: str, reason: str, n: int = 1) -> bool:
    """Counts an index-time skip once per process for `token` (e.g. a shard path), however often the source that
    finds it is built (train, eval and tokenizer sampling all build sources). Returns whether it counted."""
    with _ONCE_LOCK:
        if token in _COUNTED_ONCE:
            return False
        _COUNTED_ONCE.add(token)
    count(reason, n)
    return True


def add_counts(counts: Mapping[str, int]) -> None:
    """Adds already-keyed counts (``skipped/x``, ``dropped_caption/y``, ``served``, ...)."""
    _COUNTER.update(counts)


def set_gauge(key: str, value: float) -> None:
    """Records a value (e.g. ``caption_noise/dataset_rate``) reported by `data_metrics`."""
    _COUNTER.set_gauge(key, value)


def counts() -> dict[str, int]:
    """This process's skip/drop counts so far, e.g. ``{'skipped/truncated_image': 3}``."""
    values, _ = _COUNTER.snapshot()
    return {k: v for k, v in values.items() if k.startswith((SKIPPED + "/", DROPPED_CAPTION + "/"))}


def skipped() -> dict[str, int]:
    """``{reason: n}`` of whole records skipped in this process so far."""
    return {k.split("/", 1)[1]: v for k, v in counts().items() if k.startswith(SKIPPED + "/")}


def reset() -> None:
    """Zeroes every count (tests; a fresh run in the same process)."""
    _COUNTER.reset()
    with _ONCE_LOCK:
        _COUNTED_ONCE.clear()


def data_metrics(prefix: str = "data/") -> dict[str, float]:
    """Scalars for the metric writer: skip/drop counts, the realised caption-noise rate and gauges."""
    values, gauges = _COUNTER.snapshot()
    out: dict[str, float] = {}
    for key, n in sorted(values.items()):
        if key.startswith((SKIPPED + "/", DROPPED_CAPTION + "/")):
            out[prefix + key] = float(n)
    served = values.get(SERVED, 0)
    if served:
        out[prefix + "caption_noise/realised"] = values.get(SWAPPED, 0) / served
    out.update({prefix + k: v for k, v in sorted(gauges.items())})
    return out


def merge_into(target: dict[str, int], counts_: Mapping[str, int] | None) -> dict[str, int]:
    for key, n in (counts_ or {}).items():
        target[key] = target.get(key, 0) + int(n)
    return target


class _SkipBadIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self._pending: dict[str, int] = {}

    def __next__(self) -> Any:
        while True:
            element = next(self._parent)
            if isinstance(element, Skipped):
                key = f"{SKIPPED}/{element.reason}"
                self._pending[key] = self._pending.get(key, 0) + 1
                merge_into(self._pending, dict(element.extra))
                continue
            if self._pending:
                element = dict(element)
                element[ELEMENT_KEY] = merge_into(dict(self._pending), element.get(ELEMENT_KEY))
                self._pending = {}
            return element

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)
        self._pending = {}


class SkipBadIterDataset(grain.IterDataset):
    """Drops `Skipped` markers (so a following batch stays full-size), carrying their counts along."""

    def __init__(self, parent: grain.IterDataset):
        super().__init__(parent)

    def __iter__(self) -> grain.DatasetIterator:
        return _SkipBadIterator(self._parent.__iter__())

    def __str__(self) -> str:
        return "SkipBadIterDataset"


def batch_stats(elements: list[dict[str, Any]]) -> dict[str, int]:
    """The counts a batch carries: skips/drops attached to its elements, records served, captions swapped."""
    stats: dict[str, int] = {SERVED: len(elements),
                             SWAPPED: sum(bool(e.get("caption_swapped", False)) for e in elements)}
    for e in elements:
        merge_into(stats, e.get(ELEMENT_KEY))
    return stats


class StatsSink(grain.transforms.Map):
    """Last pipeline stage: moves ``batch['_stats']`` into this process's counter and returns the batch."""

    def map(self, batch: dict[str, Any]) -> dict[str, Any]:
        if isinstance(batch, dict) and STATS_KEY in batch:
            batch = dict(batch)
            add_counts(batch.pop(STATS_KEY))
        return batch
