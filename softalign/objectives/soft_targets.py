"""PSD knobs that are not the loss itself: the alpha ramp and the per-step subset S.

See docs/method.md: ``alpha_t = alpha_max * ramp(t)`` and S is a random subset of about ``rho * B`` rows of the
global batch, drawn each step from the step's RNG.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

RAMPS = ("linear", "cosine", "constant")


def alpha_schedule(
    alpha_max: float, ramp: str, start_step: int, end_step: int
) -> Callable[[jax.Array | int], jax.Array]:
    """Returns ``step -> alpha_t``: 0 before ``start_step``, ``alpha_max`` from ``end_step`` on.

    ``linear`` and ``cosine`` rise from 0 to ``alpha_max`` between the two steps; ``constant`` is ``alpha_max``
    throughout (the ramp steps are ignored).
    """
    if ramp not in RAMPS:
        raise ValueError(f"psd.ramp must be one of {RAMPS}, got {ramp!r}")
    if ramp == "constant":
        return optax.constant_schedule(alpha_max)
    if int(end_step) < int(start_step):
        raise ValueError(f"psd.ramp_start={start_step} is after the ramp's end {end_step} (psd.ramp_end, or "
                         "num_steps when it is -1)")
    span = max(int(end_step) - int(start_step), 1)
    if ramp == "linear":
        return optax.linear_schedule(0.0, alpha_max, transition_steps=span, transition_begin=int(start_step))
    decay = optax.cosine_decay_schedule(alpha_max, decay_steps=span)  # alpha_max -> 0, half-cosine

    def cosine(step):
        shifted = jnp.asarray(step) - int(start_step)
        return jnp.where(shifted <= 0, 0.0, alpha_max - decay(jnp.maximum(shifted, 0)))

    return cosine


MAX_DEFAULT_GROUPS = 256  # psd.subset_groups=0: the most strata the default takes (a power of two)
MIN_GROUP_ROWS = 16  # ... and the fewest rows per stratum, so ceil(rho * rows) stays close to rho * rows


def resolve_groups(subset_groups: int, batch_size: int) -> int:
    """The number of strata of S: ``subset_groups``, or for 0 the largest power of two <= 256 that divides the
    global batch into groups of at least 16 rows (8 for B = 128, 256 for B = 32,768; 1 below B = 32).

    The default depends on the batch alone, never on the mesh, so S, and with it the whole run, is the same on any
    number of devices or processes (elastic resume). It keeps the teacher's forward local wherever the device
    count divides it (any power of two up to 256 devices with >= 16 rows each); elsewhere the gather of S crosses
    devices, which is correct, only slower (the step logs a note)."""
    if subset_groups > 0:
        return int(subset_groups)
    groups = 1
    while groups * 2 <= MAX_DEFAULT_GROUPS and batch_size % (groups * 2) == 0 \
            and batch_size // (groups * 2) >= MIN_GROUP_ROWS:
        groups *= 2
    return groups


def subset_layout(batch_size: int, fraction: float, groups: int) -> tuple[int, int]:
    """Returns ``(group_size, picks_per_group)`` for a stratified subset of the global batch.

    S takes ``ceil(fraction * group_size)`` rows from each of ``groups`` contiguous groups. With ``groups`` a multiple
    of the number of data shards every group lives on one device, so the teacher's forward pass on S needs no
    cross-device image traffic; for a fixed ``groups`` S is the same on any number of devices (`resolve_groups`).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"psd.subset_fraction must be in [0, 1], got {fraction}")
    if groups <= 0 or batch_size % groups:
        raise ValueError(f"psd.subset_groups={groups} must be positive and divide the global batch {batch_size}")
    group_size = batch_size // groups
    return group_size, min(group_size, math.ceil(fraction * group_size))


def draw_subset(key: jax.Array, batch_size: int, fraction: float, groups: int) -> tuple[jax.Array, jax.Array]:
    """Draws S. Returns ``(local_idx (groups, k) int32, mask (batch_size,) bool)``.

    ``local_idx[g]`` holds sorted positions inside group g; ``mask`` marks S in global batch order.
    """
    group_size, picks = subset_layout(batch_size, fraction, groups)
    keys = jax.random.split(key, groups)
    perms = jax.vmap(lambda k: jax.random.permutation(k, group_size))(keys)
    local_idx = jnp.sort(perms[:, :picks], axis=1).astype(jnp.int32)
    mask = jnp.zeros((groups, group_size), bool)
    mask = jax.vmap(lambda m, i: m.at[i].set(True))(mask, local_idx)
    return local_idx, mask.reshape(batch_size)


def gather_subset(x: jax.Array, local_idx: jax.Array) -> jax.Array:
    """Takes the rows of S from ``x`` (global batch first), group by group: ``(groups * k, ...)``."""
    groups, picks = local_idx.shape
    grouped = x.reshape((groups, x.shape[0] // groups) + x.shape[1:])
    taken = jax.vmap(lambda xg, ig: xg[ig])(grouped, local_idx)
    return taken.reshape((groups * picks,) + x.shape[1:])


def scatter_subset(rows: jax.Array, local_idx: jax.Array, batch_size: int) -> jax.Array:
    """Inverse of :func:`gather_subset`: places S's rows back at their batch positions, zeros elsewhere."""
    groups, picks = local_idx.shape
    grouped = rows.reshape((groups, picks) + rows.shape[1:])
    empty = jnp.zeros((groups, batch_size // groups) + rows.shape[1:], rows.dtype)
    placed = jax.vmap(lambda e, r, i: e.at[i].set(r))(empty, grouped, local_idx)
    return placed.reshape((batch_size,) + rows.shape[1:])
