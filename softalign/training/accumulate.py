"""Exact gradient accumulation for a contrastive loss, by the cached-feature method (GradCache).

A contrastive loss couples every pair in the batch, so summing per-micro-batch gradients is NOT the full-batch
gradient. Instead:
  1. embed every micro-batch without gradients (no activations kept);
  2. evaluate the full-batch loss on those embeddings and take its gradient w.r.t. the embeddings (B x D, small);
  3. re-run each micro-batch's forward pass and back-propagate its slice of those embedding gradients.
The result equals the full-batch gradient up to float summation order, at the cost of one extra forward pass and
the activation memory of one micro-batch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from softalign.parallel.sharding import BATCH_AXES

EmbedFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]
LossFn = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
SplitFn = Callable[[Any], tuple[Any, Any]]


def _split(x: jax.Array, num_micro: int, mesh: Mesh, axis) -> jax.Array:
    """(B, ...) -> (M, B/M, ...) with row i in micro-batch i % M, so every device holds part of each micro-batch."""
    grouped = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1)
    spec = P(None, axis, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(grouped, NamedSharding(mesh, spec))


def _merge(x: jax.Array) -> jax.Array:
    """Inverse of :func:`_split`: back to the batch's own row order."""
    return x.swapaxes(0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _no_split(params: Any) -> tuple[Any, Any]:
    return params, {}


def cached_feature_grads(embed: EmbedFn, loss_of_embeddings: LossFn, params: Any, images: jax.Array,
                         tokens: jax.Array, num_micro: int, mesh: Mesh, axis=BATCH_AXES, split: SplitFn = _no_split):
    """Returns ``((loss, aux), grads, objective_grads)`` of
    ``loss_of_embeddings(*embed(params, images, tokens), objective_params)`` over the whole batch, running the towers
    on ``num_micro`` micro-batches at a time. ``split(params)`` gives ``(model params, objective params)``. The
    towers never read the objective's own leaves, so ``grads`` holds zeros there; their gradient is
    ``objective_grads``, taken from the loss directly."""
    imgs, toks = _split(images, num_micro, mesh, axis), _split(tokens, num_micro, mesh, axis)
    frozen = jax.lax.stop_gradient(params)
    u, v, scales = jax.lax.map(lambda it: embed(frozen, *it), (imgs, toks))
    (loss, aux), (du, dv, dscale, dobj) = jax.value_and_grad(loss_of_embeddings, argnums=(0, 1, 2, 3), has_aux=True)(
        _merge(u), _merge(v), scales[0], split(params)[1])
    du, dv = _split(du, num_micro, mesh, axis), _split(dv, num_micro, mesh, axis)

    def backprop(acc, xs):
        image, token, g_img, g_txt = xs
        _, pullback = jax.vjp(lambda p: embed(p, image, token), params)
        (grads,) = pullback((g_img, g_txt, dscale / num_micro))  # the scale is shared: its gradient splits evenly
        return jax.tree.map(jnp.add, acc, grads), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(backprop, zeros, (imgs, toks, du, dv))
    return (loss, aux), grads, dobj
