"""Caption noise for experiments: a wrapper source that swaps a fraction of captions with other records' captions.

Whether record i is swapped, and with whom, is a pure function of (seed, i): a counter-based hash (SplitMix64),
so it is independent of batch order, shuffling, epochs, processes and worker counts, and O(1) per record. The
realised rate of the whole split is known without reading any data (`NoisyCaptions.realised_rate`); the rate among
records actually served is reported by the pipeline as ``data/caption_noise/realised``.

The synthetic source implements the same idea internally; every other source is wrapped by `build_source`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from softalign.data import decode

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_SWAP_STREAM, _PARTNER_STREAM = 1, 2
_RATE_EXACT_UP_TO = 1 << 24     # realised_rate is exact up to this many records, a uniform sample beyond


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (wrapping uint64 arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def uniform(seed: int, stream: int, indices: Any) -> np.ndarray:
    """Deterministic U[0, 1) per (seed, stream, index), float64, vectorised over `indices`."""
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    key = _mix(np.array([(int(seed) & 0xFFFFFFFF) * 0x10001 + int(stream)], np.uint64))
    return (_mix(idx ^ key) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def swap_partners(rate: float, seed: int, n: int, indices: Any) -> np.ndarray:
    """For each index: the record whose captions it gets, or -1 when it keeps its own."""
    idx = np.asarray(indices, dtype=np.int64)
    if rate <= 0.0 or n < 2:
        return np.full(idx.shape, -1, np.int64)
    swap = uniform(seed, _SWAP_STREAM, idx) < rate
    partner = np.floor(uniform(seed, _PARTNER_STREAM, idx) * (n - 1)).astype(np.int64)
    partner += partner >= idx            # uniform over the other n - 1 records
    return np.where(swap, partner, -1)


def captions_of(source: Any, index: int) -> list[Any]:
    """Raw captions of a record, without decoding its image (cheap when the source offers `captions_of`)."""
    if hasattr(source, "captions_of"):
        return list(source.captions_of(index))
    return decode.raw_captions(source[index])


class NoisyCaptions:
    """Random-access source: `source` with a `rate` fraction of records' captions replaced by another record's."""

    def __init__(self, source: Any, rate: float, seed: int = 0):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"caption_noise must be in [0, 1], got {rate}")
        self.source, self.rate, self.seed = source, float(rate), int(seed)
        self._n = len(source)
        self._realised: float | None = None

    def __len__(self) -> int:
        return self._n

    def partner(self, index: int) -> int | None:
        p = int(swap_partners(self.rate, self.seed, self._n, [index])[0])
        return None if p < 0 else p

    @property
    def realised_rate(self) -> float:
        """Fraction of this split's records whose captions are swapped (exact up to 2**24 records)."""
        if self._realised is None:
            n = self._n
            if n <= _RATE_EXACT_UP_TO:
                idx = np.arange(n, dtype=np.int64)
            else:
                idx = np.linspace(0, n - 1, _RATE_EXACT_UP_TO).astype(np.int64)
            swapped = 0
            for start in range(0, len(idx), 1 << 20):
                swapped += int(np.sum(swap_partners(self.rate, self.seed, n, idx[start:start + (1 << 20)]) >= 0))
            self._realised = swapped / max(len(idx), 1)
        return self._realised

    def captions_of(self, index: int) -> list[Any]:
        partner = self.partner(index)
        return captions_of(self.source, index if partner is None else partner)

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        record = dict(self.source[index])
        partner = self.partner(index)
        if partner is not None:
            record.pop("caption", None)
            record["captions"] = captions_of(self.source, partner)
            record["caption_swapped"] = True
        return record

    def __repr__(self) -> str:
        return f"NoisyCaptions({self.source!r}, rate={self.rate}, seed={self.seed})"
