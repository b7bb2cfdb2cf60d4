"""Run an embedding function over an evaluation set in fixed-size batches.

The last batch is padded, not dropped, so every call has one shape and compiles once. `embed_batches` takes any
stream of batches (e.g. JPEGs decoded on the fly); `embed_in_batches` slices an in-memory array.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

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


def embed_batches(
    fn: Callable[[jax.Array], jax.Array],
    batches: Iterable[np.ndarray],
    batch_size: int,
    sharding: Optional[jax.sharding.Sharding] = None,
    *,
    jit: bool = True,
    on_batch: Optional[Callable[[int, int], None]] = None,
) -> Optional[np.ndarray]:
    """Embeds a stream of batches of at most `batch_size` rows; returns the (rows, D) outputs, or None if empty.

    Every batch is padded to `batch_size` rows, so `fn` sees one shape and compiles once; the padding rows are
    cut from the output. Batch k+1 is produced (e.g. decoded from JPEG) while batch k runs on the device.
    ``on_batch(batches_done, rows_done)`` is called after each batch is dispatched.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if sharding is not None:
        shards = _num_batch_shards(sharding)
        if batch_size % shards:
            raise ValueError(
                f"batch_size={batch_size} is not divisible by the {shards} devices that "
                "the sharding splits the batch dimension over.")
    jitted = fn if (hasattr(fn, "lower") or not jit) else jax.jit(fn)
    outputs: list[np.ndarray] = []
    pending = None  # (device output, real rows) of the previous batch, fetched one step behind.
    rows = 0
    for done, batch in enumerate(batches, start=1):
        batch = np.asarray(batch)
        if not 0 < batch.shape[0] <= batch_size:
            raise ValueError(f"batch {done} has {batch.shape[0]} rows; expected 1..{batch_size}.")
        real = batch.shape[0]
        batch = _pad_rows(batch, batch_size)
        batch = jax.device_put(batch, sharding) if sharding is not None else batch
        result = jitted(batch)  # Dispatched asynchronously; fetch the previous one meanwhile.
        if pending is not None:
            outputs.append(_to_numpy(pending[0])[:pending[1]])
        pending = (result, real)
        rows += real
        if on_batch is not None:
            on_batch(done, rows)
    if pending is None:
        return None
    outputs.append(_to_numpy(pending[0])[:pending[1]])
    return np.concatenate(outputs, axis=0)


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
    ``progress(batches_done, num_batches)`` is called after each batch.
    """
    array = np.asarray(array)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    n = array.shape[0]
    num_batches = -(-n // batch_size)

    def on_batch(done: int, rows: int) -> None:
        if log_every > 0 and (done % log_every == 0 or done == num_batches):
            logging.info("embedded %d/%d batches (%d rows)", done, num_batches, n)
        if progress is not None:
            progress(done, num_batches)

    batches = (array[b * batch_size:(b + 1) * batch_size] for b in range(num_batches))
    out = embed_batches(fn, batches, batch_size, sharding, jit=jit, on_batch=on_batch)
    if out is None:  # No rows: the output width from the function's abstract evaluation.
        jitted = fn if (hasattr(fn, "lower") or not jit) else jax.jit(fn)
        spec = jax.ShapeDtypeStruct((batch_size,) + array.shape[1:], array.dtype)
        shape = jax.eval_shape(jitted, spec)
        return np.zeros((0,) + tuple(shape.shape[1:]), shape.dtype)
    return out
