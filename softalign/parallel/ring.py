"""A ring over a mesh axis: each device passes a block to the next, so after N hops every device has seen every
block (the chunked contrastive losses' key blocks travel this way)."""

from __future__ import annotations

from typing import Callable

import jax


def ring(axis, size: int) -> tuple[Callable, Callable]:
    """``(rotate, owner_offset)``: ``rotate(x)`` passes ``x`` to the next device over ``axis``;
    ``owner_offset(r, rows)`` is the first global row of the block a device holds after ``r`` hops."""
    if size == 1:
        return (lambda x: x), (lambda r, rows: r * 0)
    perm = [(i, (i + 1) % size) for i in range(size)]
    rotate = lambda x: jax.lax.ppermute(x, axis, perm)
    me = jax.lax.axis_index(axis)
    return rotate, (lambda r, rows: ((me - r) % size) * rows)
