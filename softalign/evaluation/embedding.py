"""Run an embedding function over a numpy array in fixed-size batches (evaluation sets).

The last batch is padded, not dropped, so every call has one shape and compiles once.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

ProgressFn = Callable[[int, int], None]


def _num_batch_shards(sharding: jax.sharding.Sharding) -> int:
    """How many ways `sharding` splits the leading (batch) dimension."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = sharding.spec
        if len(spec) == 0 or spec[0] is None:
            return 1
        names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
        return int(np.prod([sharding.mesh.shape[n] for n in names]))
    return len(sharding.device_set)


def _to_numpy(x: jax.Array) -> np.ndarray:
    """Fetch a (possibly multi-process sharded) array to host memory."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _pad_rows(batch: np.ndarray, batch_size: int) -> np.ndarray:
    """Pad `batch` up to `batch_size` rows by repeating its last row (real data, no NaNs)."""
    missing = batch_size - batch.shape[0]
    if missing == 0:
        return batch
    widths = [(0, missing)] + [(0, 0)] * (batch.ndim - 1)
    return np.pad(batch, widths, mode="edge")


def embed_in_batches(
    fn: Callable[[jax.Array], jax.Array],
    array: np.ndarray,
    batch_size: int,
    sharding: Optional[jax.sharding.Sharding] = None,
    *,
    log_every: int = 0,
    progress: Optional[ProgressFn] = None,
    jit: bool = True,
) -> np.ndarray:
    """Map `fn` ((batch_size, ...) -> (batch_size, D), jitted if it is not already) over `array`; returns (N, D).

    With `sharding` each batch is device_put onto it (multi-process: all pass the same full array); quiet by default.
    Pass ``jit=False`` when `fn` already runs compiled code, e.g. ``functools.partial(jitted_apply, params)``
    (jitting a closure over parameters would bake them in as constants and recompile for every checkpoint).
    """
    array = np.asarray(array)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if sharding is not None:
        shards = _num_batch_shards(sharding)
        if batch_size % shards:
            raise ValueError(
                f"batch_size={batch_size} is not divisible by the {shards} devices that "
                "the sharding splits the batch dimension over.")
    jitted = fn if (hasattr(fn, "lower") or not jit) else jax.jit(fn)

    n = array.shape[0]
    if n == 0:
        spec = jax.ShapeDtypeStruct((batch_size,) + array.shape[1:], array.dtype)
        out = jax.eval_shape(jitted, spec)
        return np.zeros((0,) + tuple(out.shape[1:]), out.dtype)

    num_batches = -(-n // batch_size)
    outputs: list[np.ndarray] = []
    pending = None  # The previous batch's device output, fetched one step behind.
    for b in range(num_batches):
        batch = _pad_rows(array[b * batch_size:(b + 1) * batch_size], batch_size)
        batch = jax.device_put(batch, sharding) if sharding is not None else batch
        result = jitted(batch)  # Dispatched asynchronously; fetch the previous one meanwhile.
        if pending is not None:
            outputs.append(_to_numpy(pending))
        pending = result
        done = b + 1
        if log_every > 0 and (done % log_every == 0 or done == num_batches):
            logging.info("embedded %d/%d batches (%d rows)", done, num_batches, n)
        if progress is not None:
            progress(done, num_batches)
    outputs.append(_to_numpy(pending))
    return np.concatenate(outputs, axis=0)[:n]
