"""A fixed, seeded, nested subset of the train split for data-size studies (``data.train_fraction``).

The subset of fraction f of an N-record split is the first ceil(f * N) entries of one permutation of [0, N) drawn
from ``data.seed`` alone. The permutation does not depend on f, so the subsets are nested: the 0.1 subset is
contained in the 0.3 subset, which is contained in the whole split. They do not depend on the training seed
(``config.seed``) either, so every seed of a sweep sees the same records. `build_source` applies caption noise to
the whole split first, so a record keeps the same (possibly swapped) captions at every fraction.

Record indices. The subset numbers its records 0 .. ceil(f * N) - 1 in permutation order: its record k is record
``perm[k]`` of the split, the same record at every fraction. So ``batch['index']`` always indexes the source that
``build_source(data_config, 'train')`` returns, as without a subset: it lies in [0, len(train source)), and a
per-record bank (e.g. a memory teacher's) can be sized by that length. `original_index` maps back to the
split's own record number. With f = 1 no subset is made and the indices are the split's own.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_SUBSET_STREAM = 0x5B5E7   # keeps the subset's permutation independent of the other seeded streams


def subset_size(fraction: float, n: int) -> int:
    """Records kept from an ``n``-record split at ``fraction``: ceil(fraction * n), at least 1 when n > 0."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"data.train_fraction must be in (0, 1], got {fraction}")
    return min(n, max(1 if n else 0, math.ceil(fraction * n - 1e-9)))


def subset_indices(fraction: float, n: int, seed: int) -> np.ndarray:
    """The split's record numbers kept at ``fraction``: a prefix of one seeded permutation of [0, n)."""
    perm = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, _SUBSET_STREAM])).permutation(n)
    kept = perm[:subset_size(fraction, n)]
    return kept.astype(np.int32 if n < 2**31 else np.int64)   # half the memory shipped to Grain workers


def load_subset_file(path: str, n: int) -> np.ndarray:
    """``data.subset_file``: a .npy of distinct record numbers of the n-record split (e.g. from
    ``python -m softalign.tools.reduce``), kept in the file's order."""
    indices = np.load(path, allow_pickle=False)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer) or not len(indices):
        raise ValueError(f"data.subset_file={path}: expected a non-empty 1-D integer array, got {indices.dtype} "
                         f"{indices.shape}")
    if indices.min() < 0 or indices.max() >= n or len(np.unique(indices)) != len(indices):
        raise ValueError(f"data.subset_file={path}: indices must be distinct and in [0, {n})")
    return indices.astype(np.int32 if n < 2**31 else np.int64)


class TrainSubset:
    """Random-access source: records ``indices[0], indices[1], ...`` of ``source``, re-numbered 0, 1, ...
    (the seeded prefix for ``fraction``, or the given ``indices``, e.g. `load_subset_file`'s)."""

    def __init__(self, source: Any, fraction: float = 1.0, seed: int = 0, indices: Any = None):
        self.source, self.fraction, self.seed = source, float(fraction), int(seed)
        self.full_size = len(source)
        self._indices = subset_indices(self.fraction, self.full_size, self.seed) if indices is None else indices

    def __len__(self) -> int:
        return len(self._indices)

    def original_index(self, index: int) -> int:
        """The split's own record number of this subset's record ``index``."""
        return int(self._indices[int(index)])

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        record = dict(self.source[self.original_index(index)])
        record["index"] = index
        return record

    def captions_of(self, index: int) -> list[Any]:
        """Raw captions of record ``index`` without decoding its image (used to fit tokenizers)."""
        from softalign.data import noise
        return noise.captions_of(self.source, self.original_index(index))

    def __repr__(self) -> str:
        return f"TrainSubset({self.source!r}, fraction={self.fraction}, seed={self.seed}, size={len(self)})"
