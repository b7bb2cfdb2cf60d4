"""SigLIP's pairwise sigmoid loss (Zhai et al., ICCV 2023), row-sharded over the mesh, with a learnable bias.

    x_ij = s * u_i . v_j + b,    loss = -(1/B) * sum_i sum_j log sigmoid(z_ij * x_ij),    z_ij = +1 if j == i else -1

``s`` is the model's logit scale (SigLIP starts it at 10: ``model.logit_scale_init``), ``b`` the objective's own
leaf ``params["objective"]["bias"]`` (``objective.siglip_bias_init``, -10). Dividing the sum over all B x B pairs by
B is big_vision's normalisation (the mean over images of each image's sum over texts, on the global batch), so
the loss does not depend on how the batch is split. Each pair is its own binary problem, so the loss is already
symmetric in images and texts. Each device builds only its b x B block; ``loss_chunk_size > 0`` uses the ring +
chunk form in ``siglip_chunked.py`` instead (same value and gradients, no b x B array).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from softalign.objectives.base import LossInputs, ObjectiveContext
from softalign.objectives.siglip_chunked import SigmoidSums, chunked_sigmoid_sums, pair_terms
from softalign.parallel.sharding import BATCH_AXES


def _column_argmax(x, labels, axis):
    """For each of the B columns, the global row index of its largest entry over all devices' rows (ties: the
    smallest index, as ``siglip_chunked.better``)."""
    col_max = jax.lax.pmax(x.max(axis=0), axis)
    mine = jnp.where(x == col_max[None, :], labels[:, None], jnp.iinfo(labels.dtype).max)
    return jax.lax.pmin(mine.min(axis=0), axis)


def _local_sums(u, v, scale, bias, *, axis, chunk_size, ring_size):
    """This device's rows against all B columns; returns the ``psum`` over devices (replicated)."""
    b = u.shape[0]
    labels = jax.lax.axis_index(axis) * b + jnp.arange(b)
    if chunk_size > 0:
        # The custom_vjp returns per-device gradients for scale and bias; marking them device-varying makes JAX
        # psum them.
        scale, bias = (jax.lax.pcast(a, axis, to="varying") for a in (scale, bias))
        return jax.lax.psum(chunked_sigmoid_sums(u, v, scale, bias, labels, chunk_size, axis, ring_size), axis)
    v_all = jax.lax.all_gather(v, axis, tiled=True)
    dots = jnp.einsum("id,jd->ij", u, v_all, preferred_element_type=u.dtype)
    positive = jnp.arange(v_all.shape[0])[None, :] == labels[:, None]
    x, nll = pair_terms(dots, scale, bias, positive)
    xs = jax.lax.stop_gradient(x)  # the metrics carry no gradient
    pos = jnp.where(positive, xs, 0.0).sum()
    row_arg = jnp.argmax(xs, axis=1)
    col_arg = _column_argmax(xs, labels, axis)[labels]  # the columns this device owns
    correct = lambda a: (a == labels).astype(u.dtype).sum()
    return jax.lax.psum(SigmoidSums(nll.sum(), pos, xs.sum() - pos, correct(row_arg), correct(col_arg)), axis)


def sigmoid_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    mesh: Mesh,
    axis: str | tuple[str, ...] = BATCH_AXES,
    chunk_size: int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """SigLIP loss for a global batch whose rows are split over the mesh axes ``axis``; ``(loss, metrics)``.

    ``chunk_size > 0`` passes the text blocks around the devices and tiles them in chunks of that many columns
    (``siglip_chunked.py``): O(b * (chunk + D)) memory per device instead of O(b * B + B * D).
    """
    batch = image_emb.shape[0]
    dtype = jnp.promote_types(image_emb.dtype, jnp.float32)  # f32, or f64 when a test enables x64
    scale, bias = jnp.asarray(scale, dtype), jnp.asarray(bias, dtype)
    row = P(axis)
    axes = axis if isinstance(axis, tuple) else (axis,)
    ring_size = int(np.prod([mesh.shape[a] for a in axes]))
    sums = jax.shard_map(
        lambda u, v, s, b: _local_sums(u, v, s, b, axis=axis, chunk_size=chunk_size, ring_size=ring_size),
        mesh=mesh,
        in_specs=(row, row, P(), P()),
        out_specs=P(),
    )(image_emb.astype(dtype), text_emb.astype(dtype), scale, bias)
    loss = sums.loss / batch
    metrics = {
        "loss": loss,
        "logit_scale": jax.lax.stop_gradient(scale),
        "bias": jax.lax.stop_gradient(bias),
        "i2t_acc": sums.i2t_correct / batch,
        "t2i_acc": sums.t2i_correct / batch,
        "pos_logit": sums.pos / batch,  # mean x_ii
        "neg_logit": sums.neg / float(max(batch * (batch - 1), 1)),  # mean x_ij, j != i (float: B² overflows int32)
    }
    return loss, metrics


class SigLIP:
    """``objective.name="siglip"``: :func:`sigmoid_loss` with its bias as a learnable leaf.

    Built from ``objective.siglip_bias_init`` and ``loss_chunk_size``. It takes no PSD soft targets
    (docs/method.md, "SigLIP", says why), so ``config.checks`` asks for ``psd.alpha_max=0``.
    """

    name = "siglip"
    supports_soft_targets = False

    def __init__(self, mesh: Mesh | None, *, bias_init: float = -10.0, chunk_size: int = 0):
        if not math.isfinite(bias_init):
            raise ValueError(f"objective.siglip_bias_init={bias_init} must be finite")
        if chunk_size < 0:
            raise ValueError(f"loss_chunk_size={chunk_size} must be >= 0 (0: unchunked)")
        self.mesh, self.bias_init, self.chunk_size = mesh, float(bias_init), int(chunk_size)

    @classmethod
    def from_context(cls, context: ObjectiveContext) -> "SigLIP":
        c = context.config
        return cls(context.mesh, bias_init=c.objective.get("siglip_bias_init", -10.0), chunk_size=c.loss_chunk_size)

    def init_params(self) -> dict[str, jax.Array]:
        return {"bias": jnp.asarray(self.bias_init, jnp.float32)}

    def __call__(self, inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        return sigmoid_loss(inputs.image_emb, inputs.text_emb, inputs.scale, inputs.params["bias"], mesh=self.mesh,
                            chunk_size=self.chunk_size)
