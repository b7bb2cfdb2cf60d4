"""SigLIP's sigmoid loss in O(b * (c + D)) memory per device: key blocks travel a ring, chunks within a block.

Each device keeps its b query rows (image embeddings) and its own block of b key rows (text embeddings). The key
blocks travel around the ring of N devices (``ppermute``); after N hops every device has met all B columns and
every block is back with its owner. Each block is processed in column chunks of c. The sigmoid loss is a plain sum
over pairs (no log-sum-exp), so a chunk only adds to running sums; the column-wise argmax (for ``t2i_acc``) rides
around the ring with its block, like the key gradients in the backward pass.

The backward pass (``custom_vjp``) recomputes each chunk's logits x and applies d/dx -log sigmoid(z x) =
sigmoid(x) - y, with y = 1 on the paired column and 0 elsewhere. No b x B array exists in either pass.
``siglip._local_sums`` (unchunked) is the reference.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from softalign.parallel.ring import ring


class SigmoidSums(NamedTuple):
    """Sums over one device's rows; ``psum``-ed over the mesh. Only ``loss`` carries gradients."""

    loss: jax.Array  # sum over rows i and all columns j of -log sigmoid(z_ij * x_ij)
    pos: jax.Array  # sum of the positive (paired) logits x_ii
    neg: jax.Array  # sum of the negative logits x_ij, j != i
    i2t_correct: jax.Array  # rows whose argmax over columns is the paired column
    t2i_correct: jax.Array  # columns owned by this device whose argmax over all rows is the paired row


def pair_terms(dots: jax.Array, scale: jax.Array, bias: jax.Array, positive: jax.Array):
    """``(x, -log sigmoid(z * x))`` for dot products ``dots``; ``positive`` marks z = +1."""
    x = scale * dots + bias
    return x, jax.nn.softplus(jnp.where(positive, -x, x))


def better(value, index, best, best_index):
    """Whether (value, index) beats (best, best_index) for an argmax: larger, or equal with the smaller index, so
    the result does not depend on the order in which the ring visits the columns."""
    return (value > best) | ((value == best) & (index < best_index))


def _chunks(x, chunk, fill):
    """Pads the leading axis to a multiple of ``chunk`` with ``fill`` and splits it: (n, c, ...)."""
    n = -(-x.shape[0] // chunk)
    pad = [(0, n * chunk - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, pad, constant_values=fill).reshape((n, chunk) + x.shape[1:])


def _block_xs(keys, chunk, col0):
    """A block's chunks: keys (n, c, D), real-column mask (n, c), global column indices (n, c)."""
    rows = keys.shape[0]
    cols = jnp.arange(rows)
    return (_chunks(keys, chunk, 0), _chunks(cols < rows, chunk, False), _chunks(cols + col0, chunk, -1))


def _forward(q, keys, scale, bias, labels, chunk, axis, size):
    rows = keys.shape[0]
    chunk = min(chunk, rows)  # a chunk wider than the block would only add padding
    zero = q[0, 0] * 0  # derived from q so that, inside shard_map, the scan carry varies over devices like q
    big = labels.shape[0] * size  # an index past every row: loses every tie
    carry = dict(loss=zero, pos=zero, neg=zero, best=q[:, 0] * 0 - jnp.inf, arg=labels * 0 + big)

    def body(c, xs):
        k, real, col, col_best, col_arg = xs
        dots = jnp.einsum("id,jd->ij", q, k, preferred_element_type=q.dtype)
        positive = col[None, :] == labels[:, None]
        x, nll = pair_terms(dots, scale, bias, positive)
        x = jnp.where(real[None, :], x, -jnp.inf)
        row_max, row_arg = x.max(axis=1), col[jnp.argmax(x, axis=1)]
        row_wins = better(row_max, row_arg, c["best"], c["arg"])
        cmax, carg = x.max(axis=0), labels[jnp.argmax(x, axis=0)]
        col_wins = better(cmax, carg, col_best, col_arg)
        finite = jnp.where(real[None, :], x, 0.0)
        pos = jnp.where(positive, finite, 0.0).sum()
        new = dict(loss=c["loss"] + jnp.where(real[None, :], nll, 0.0).sum(), pos=c["pos"] + pos,
                   neg=c["neg"] + finite.sum() - pos, best=jnp.where(row_wins, row_max, c["best"]),
                   arg=jnp.where(row_wins, row_arg, c["arg"]))
        return new, (jnp.where(col_wins, cmax, col_best), jnp.where(col_wins, carg, col_arg))

    rotate, offset = ring(axis, size)

    def hop(state, r):  # one ring step: this block's chunks, then pass the block (and its column argmax) on
        c, (k, col_best, col_arg) = state
        xs = _block_xs(k, chunk, offset(r, rows)) + (_chunks(col_best, chunk, -jnp.inf), _chunks(col_arg, chunk, big))
        c, (col_best, col_arg) = jax.lax.scan(body, c, xs)
        block = (k, col_best.reshape(-1)[:rows], col_arg.reshape(-1)[:rows])
        return (c, jax.tree.map(rotate, block)), None

    no_col = keys[:, 0] * 0
    init = (carry, (keys, no_col - jnp.inf, no_col.astype(labels.dtype) + big))
    (c, (_, _, col_arg)), _ = jax.lax.scan(hop, init, jnp.arange(size))
    own_cols = offset(size, rows) + jnp.arange(rows)  # after N hops every block is home again
    correct = lambda a, b: (a == b).astype(q.dtype).sum()
    return SigmoidSums(c["loss"], c["pos"], c["neg"], correct(c["arg"], labels), correct(col_arg, own_cols))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def chunked_sigmoid_sums(q, keys, scale, bias, labels, chunk, axis=None, size=1):
    """The same ``SigmoidSums`` as the unchunked ``siglip._local_sums``; ``loss`` carries gradients to q, keys,
    scale and bias (device-varying: the caller ``pcast``s scale and bias, so JAX sums their gradients).

    With ``size == 1`` ``keys`` are all B keys. Otherwise ``keys`` is this device's block of a ring of ``size``
    devices over ``axis``, and ``labels`` are the global indices of this device's rows (= its block's columns).
    """
    return _forward(q, keys, scale, bias, labels, chunk, axis, size)


def _fwd(q, keys, scale, bias, labels, chunk, axis, size):
    return _forward(q, keys, scale, bias, labels, chunk, axis, size), (q, keys, scale, bias, labels)


def _bwd(chunk, axis, size, res, g):
    q, keys, scale, bias, labels = res
    rows = keys.shape[0]
    chunk = min(chunk, rows)

    def body(carry, xs):
        dq, ds, db = carry
        k, real, col = xs
        dots = jnp.einsum("id,jd->ij", q, k, preferred_element_type=q.dtype)
        positive = col[None, :] == labels[:, None]
        x = scale * dots + bias
        grad_x = g.loss * jnp.where(real[None, :], jax.nn.sigmoid(x) - positive.astype(q.dtype), 0.0)
        dq = dq + scale * grad_x @ k
        return (dq, ds + jnp.sum(grad_x * dots), db + grad_x.sum()), scale * grad_x.T @ q

    rotate, offset = ring(axis, size)

    def hop(state, r):  # N hops bring every block, with its accumulated key gradient, back to its owner
        carry, (k, dk_acc) = state
        carry, dk = jax.lax.scan(body, carry, _block_xs(k, chunk, offset(r, rows)))
        block = (k, dk_acc + dk.reshape(-1, keys.shape[1])[:rows])
        return (carry, jax.tree.map(rotate, block)), None

    zero = q[0, 0] * 0
    init = ((q * 0, zero, zero), (keys, keys * 0))
    ((dq, ds, db), (_, dk)), _ = jax.lax.scan(hop, init, jnp.arange(size))
    return dq, dk, ds.astype(jnp.result_type(scale)), db.astype(jnp.result_type(bias)), None


chunked_sigmoid_sums.defvjp(_fwd, _bwd)
