"""The optional ``text_embedding`` field: K precomputed text embeddings (K, D_in) per record (FLAME / LiT).

In an ArrayRecord record it is the msgpack map ``{"dtype": "float16" | "float32", "shape": [K, D_in], "data":
<bin: the raw little-endian array>}``; other sources may hand a numpy array. `read` checks it against the shape the
run expects (``data.text_embedding_shape``) and returns float32; a missing, malformed, wrongly shaped or non-finite
one is a ``bad_text_embedding`` skip (`softalign.data.skips`), like any other unusable record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from softalign.data import skips
from softalign.data.skips import BadRecord

DTYPES = ("float16", "float32")
FIELD = "text_embedding"


def check_array(embedding: Any) -> np.ndarray:
    """A usable (K, D_in) float16/float32 array as is; ValueError saying what is wrong otherwise."""
    arr = np.asarray(embedding)
    if arr.dtype.name not in DTYPES:
        raise ValueError(f"text_embedding dtype {arr.dtype} is not one of {DTYPES}")
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ValueError(f"text_embedding must be (K, D_in) with K, D_in >= 1, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("text_embedding has NaN or Inf entries")
    return arr


def pack(embedding: Any) -> dict[str, Any]:
    """The record-format map of a (K, D_in) float16/float32 array (checked first)."""
    arr = check_array(embedding)
    data = np.ascontiguousarray(arr, arr.dtype.newbyteorder("<")).tobytes()
    return {"dtype": arr.dtype.name, "shape": list(arr.shape), "data": data}


def unpack(value: Any) -> np.ndarray:
    """A packed map (or an array) -> float32 (K, D_in); ValueError when it is malformed."""
    if isinstance(value, dict):
        dtype, shape, data = value.get("dtype"), value.get("shape"), value.get("data")
        if dtype not in DTYPES or not isinstance(shape, (list, tuple)) or not isinstance(data, (bytes, bytearray)):
            raise ValueError("text_embedding map needs dtype in float16/float32, a shape and bytes data")
        shape = tuple(int(s) for s in shape)
        itemsize = np.dtype(dtype).itemsize
        if len(shape) != 2 or len(data) != int(np.prod(shape)) * itemsize:
            raise ValueError(f"text_embedding of shape {shape} does not match its {len(data)} bytes of {dtype}")
        value = np.frombuffer(bytes(data), np.dtype(dtype).newbyteorder("<")).reshape(shape)
    return check_array(value).astype(np.float32)


def read(record: dict[str, Any], shape: Sequence[int]) -> np.ndarray:
    """The record's embedding as float32 `shape` (K, D_in); BadRecord(bad_text_embedding) when it has none, it is
    malformed or non-finite, or its shape differs (e.g. another K)."""
    if record.get(FIELD) is None:
        raise BadRecord(skips.BAD_TEXT_EMBEDDING, "the record has no text_embedding")
    try:
        arr = unpack(record[FIELD])
    except ValueError as e:
        raise BadRecord(skips.BAD_TEXT_EMBEDDING, str(e)) from None
    if arr.shape != tuple(int(s) for s in shape):
        raise BadRecord(skips.BAD_TEXT_EMBEDDING, f"shape {arr.shape}, expected {tuple(shape)}")
    return arr


def check_table(table: Any, num_records: int) -> np.ndarray:
    """A per-record table (N, K, D_in) float16/float32 with N >= num_records (the converter's input); ValueError
    otherwise. Non-finite rows are left for the converter to skip one by one."""
    arr = np.asarray(table) if not isinstance(table, np.ndarray) else table
    if arr.dtype.name not in DTYPES or arr.ndim != 3 or min(arr.shape[1:], default=0) < 1:
        raise ValueError(f"text embeddings must be a float16/float32 array (N, K, D_in), got {arr.dtype} {arr.shape}")
    if arr.shape[0] < num_records:
        raise ValueError(f"text embeddings cover {arr.shape[0]} records, the input has {num_records}")
    return arr
