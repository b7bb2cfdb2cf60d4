"""One direction of the PSD loss in O(b * (c + D)) memory per device: a ring over devices, chunks within a block.

Each device keeps its own b key rows. The key blocks travel around the ring of N devices (``ppermute``), so after
N hops every device has seen all B columns. Nobody gathers B x D. Each block is processed in column chunks of c,
with an online log-sum-exp (as in flash attention / Inf-CL). The soft term needs the teacher's row log-sum-exp
too, so the scan also keeps a rescaled running sum of the teacher weights and of the weighted student logits:

    soft_i = LSE_i - sum_j Q_ij L_ij,    sum_j Q_ij L_ij = (sum_j e^{T_ij/tau - m} L_ij) / (sum_j e^{T_ij/tau - m})

The backward pass (``custom_vjp``) recomputes each chunk's logits and applies dCE/dL = softmax(L) - Y. The key
gradients ride around the ring with their blocks and arrive back at their owners. No b x B array exists in
either pass. ``_direction_sums`` in ``infonce.py`` is the unchunked reference.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from softalign.parallel.ring import ring

_NEG = -1e30  # finite "minus infinity" for running maxima, so exp(m_old - m_new) never sees inf - inf


class DirectionSums(NamedTuple):
    """Sums over one direction's rows (i2t or t2i) on one device; ``psum``-ed over the mesh, then averaged."""

    loss: jax.Array  # sum of per-row losses (the mixed target where in S, one-hot elsewhere)
    hard: jax.Array  # sum of one-hot cross-entropies
    soft: jax.Array  # sum over S of soft-target cross-entropies
    entropy: jax.Array  # sum over S of the soft targets' entropies
    correct: jax.Array  # rows whose argmax is the paired column
    in_subset: jax.Array  # rows in S (that have a teacher)


def _chunks(keys, valid, chunk):
    """Pads key rows to a multiple of ``chunk`` and splits them: ((n, c, D), (n, c) bool, (n, c) int)."""
    total = keys.shape[0]
    n = -(-total // chunk)
    pad = n * chunk - total
    keys = jnp.pad(keys, ((0, pad), (0, 0))).reshape(n, chunk, keys.shape[1])
    valid = jnp.pad(valid, (0, pad)).reshape(n, chunk)
    cols = jnp.arange(n * chunk).reshape(n, chunk)
    return keys, valid, cols


def _chunk_logits(q, k, scale, real):
    logits = scale * jnp.einsum("id,jd->ij", q, k, preferred_element_type=q.dtype)
    return jnp.where(real[None, :], logits, -jnp.inf)


def _teacher_chunk(logits, tq, tk, t_scale, tvalid, real, tau, use_self):
    """Teacher logits / tau for one chunk; -inf where the teacher has no column."""
    if use_self:
        return jax.lax.stop_gradient(logits) / tau
    t = t_scale * jnp.einsum("id,jd->ij", tq, tk, preferred_element_type=tq.dtype)
    return jnp.where((tvalid & real)[None, :], t / tau, -jnp.inf)


def _block_xs(keys, tkeys, tvalid, chunk, col0):
    chunk = min(chunk, keys.shape[0])  # a chunk wider than the block would only add padding
    k_chunks, real, cols = _chunks(keys, jnp.ones(keys.shape[0], bool), chunk)
    tk_chunks, tv, _ = _chunks(tkeys, tvalid, chunk)
    return k_chunks, real, cols + col0, tk_chunks, tv


def _forward(q, keys, scale, labels, rows_in_s, tq, tkeys, t_scale, tvalid, alpha, tau, chunk, use_self, axis,
             size):
    zeros = q[:, 0] * 0  # derived from q so that, inside shard_map, the scan carry varies over devices like q
    carry = dict(m=zeros + _NEG, l=zeros, label=zeros, best=zeros - jnp.inf, arg=zeros.astype(jnp.int32),
                 mt=zeros + _NEG, lt=zeros, wl=zeros, wt=zeros)

    def body(c, xs):
        k, r, col, tk, tvc = xs
        logits = _chunk_logits(q, k, scale, r)
        finite = jnp.isfinite(logits)
        m = jnp.maximum(c["m"], logits.max(axis=1))
        total = c["l"] * jnp.exp(c["m"] - m) + jnp.exp(logits - m[:, None]).sum(axis=1)
        label = c["label"] + jnp.where(col[None, :] == labels[:, None], jnp.where(finite, logits, 0.0), 0.0).sum(1)
        cmax, carg = logits.max(axis=1), col[jnp.argmax(logits, axis=1)]
        better = cmax > c["best"]
        t = _teacher_chunk(logits, tq, tk, t_scale, tvc, r, tau, use_self)
        mt = jnp.maximum(c["mt"], t.max(axis=1))
        w = jnp.exp(t - mt[:, None])
        rescale = jnp.exp(c["mt"] - mt)
        tfin = jnp.where(jnp.isfinite(t), t, 0.0)
        new = dict(m=m, l=total, label=label, best=jnp.where(better, cmax, c["best"]),
                   arg=jnp.where(better, carg, c["arg"]), mt=mt, lt=c["lt"] * rescale + w.sum(axis=1),
                   wl=c["wl"] * rescale + (w * jnp.where(finite, logits, 0.0)).sum(axis=1),
                   wt=c["wt"] * rescale + (w * tfin).sum(axis=1))
        return new, None

    rotate, offset = ring(axis, size)

    def hop(state, r):  # one ring step: this block's chunks, then pass the block on
        carry, blocks = state
        carry, _ = jax.lax.scan(body, carry, _block_xs(*blocks, chunk, offset(r, keys.shape[0])))
        return (carry, jax.tree.map(rotate, blocks)), None

    (c, _), _ = jax.lax.scan(hop, (carry, (keys, tkeys, tvalid)), jnp.arange(size))
    lse = c["m"] + jnp.log(c["l"])
    hard = lse - c["label"]
    has_t = rows_in_s & (c["lt"] > 0)
    lt = jnp.where(has_t, c["lt"], 1.0)
    lse_t = c["mt"] + jnp.log(lt)
    soft = jnp.where(has_t, lse - c["wl"] / lt, 0.0)
    entropy = jnp.where(has_t, lse_t - c["wt"] / lt, 0.0)
    per_row = jnp.where(has_t, (1.0 - alpha) * hard + alpha * soft, hard)
    sub = has_t.astype(q.dtype)
    correct = (c["arg"] == labels).astype(q.dtype)
    sums = DirectionSums(per_row.sum(), hard.sum(), (soft * sub).sum(), (entropy * sub).sum(), correct.sum(),
                         sub.sum())
    return sums, (lse, jnp.where(has_t, lse_t, 0.0), has_t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12, 13, 14))
def chunked_direction_sums(q, keys, scale, labels, rows_in_s, tq, tkeys, t_scale, tvalid, alpha, tau, chunk,
                           use_self, axis=None, size=1):
    """The same ``DirectionSums`` as ``infonce._direction_sums``; only ``loss`` carries gradients, to q/keys/scale.

    With ``size == 1`` ``keys`` are all B keys. Otherwise ``keys`` (and ``tkeys``/``tvalid``) are this device's
    block of a ring of ``size`` devices over ``axis``, and ``labels`` are global column indices.
    """
    return _forward(q, keys, scale, labels, rows_in_s, tq, tkeys, t_scale, tvalid, alpha, tau, chunk, use_self,
                    axis, size)[0]


def _fwd(q, keys, scale, labels, rows_in_s, tq, tkeys, t_scale, tvalid, alpha, tau, chunk, use_self, axis, size):
    sums, (lse, lse_t, has_t) = _forward(q, keys, scale, labels, rows_in_s, tq, tkeys, t_scale, tvalid, alpha, tau,
                                         chunk, use_self, axis, size)
    return sums, (q, keys, scale, labels, tq, tkeys, t_scale, tvalid, alpha, lse, lse_t, has_t)


def _bwd(tau, chunk, use_self, axis, size, res, g):
    q, keys, scale, labels, tq, tkeys, t_scale, tvalid, alpha, lse, lse_t, has_t = res
    mix = jnp.where(has_t, alpha, 0.0)[:, None]

    def body(carry, xs):
        dq, ds = carry
        k, r, col, tk, tvc = xs
        logits = _chunk_logits(q, k, scale, r)
        p = jnp.exp(logits - lse[:, None])
        t = _teacher_chunk(logits, tq, tk, t_scale, tvc, r, tau, use_self)
        soft_q = jnp.where(has_t[:, None], jnp.exp(t - lse_t[:, None]), 0.0)
        onehot = (col[None, :] == labels[:, None]).astype(q.dtype)
        grad_logits = g.loss * (p - (1.0 - mix) * onehot - mix * soft_q)
        dq = dq + scale * grad_logits @ k
        dk = scale * grad_logits.T @ q
        ds = ds + jnp.sum(grad_logits * jnp.where(jnp.isfinite(logits), logits, 0.0)) / scale
        return (dq, ds), dk

    rotate, offset = ring(axis, size)

    def hop(state, r):  # N hops bring every block, with its accumulated key gradient, back to its owner
        carry, (k, tk, tv, dk_acc) = state
        carry, dk = jax.lax.scan(body, carry, _block_xs(k, tk, tv, chunk, offset(r, keys.shape[0])))
        blocks = (k, tk, tv, dk_acc + dk.reshape(-1, keys.shape[1])[: keys.shape[0]])
        return (carry, jax.tree.map(rotate, blocks)), None

    init = ((q * 0, q[0, 0] * 0), (keys, tkeys, tvalid, keys * 0))
    ((dq, ds), (_, _, _, dk)), _ = jax.lax.scan(hop, init, jnp.arange(size))
    zeros = lambda x: jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.floating) else None
    return (dq, dk, ds.astype(jnp.result_type(scale)), None, None, zeros(tq), zeros(tkeys), zeros(t_scale), None,
            zeros(alpha))


chunked_direction_sums.defvjp(_fwd, _bwd)
