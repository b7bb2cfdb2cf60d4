"""FLAME's multi-positive sigmoid loss (MIV-XJTU/FLAME ``src/open_clip/loss.py``, ``--mp-sigmoid``): SigLIP's
pairwise loss where each image has K captions ("facets"), all of them positives.

    x_ij = s * u_i . v_j + b,   z_ij = +1 if text j is one of image i's K facets else -1
    loss = -(1 / (B K)) * sum_i sum_j log sigmoid(z_ij * x_ij)        over B images x B*K texts

Texts come record-major: facets ``i*K .. i*K+K-1`` belong to image i, so a device's b images and its b*K texts
are the same records (row-sharded like ``siglip.py``). Dividing by the number of texts B*K is FLAME's
normalisation; with K = 1 the loss is exactly SigLIP's. K is ``text_emb.shape[0] // image_emb.shape[0]``.
The bias is the objective's own leaf (``objective.siglip_bias_init``). Unchunked only; no PSD soft targets.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from softalign.objectives.base import LossInputs
from softalign.objectives.siglip import SigLIP
from softalign.parallel.sharding import BATCH_AXES


def _local_sums(u, v, scale, bias, *, axis, facets):
    """This device's b images against all B*K texts; returns psum'd (nll sum, pos logit sum, correct i2t)."""
    b = u.shape[0]
    rows = jax.lax.axis_index(axis) * b + jnp.arange(b)
    v_all = jax.lax.all_gather(v, axis, tiled=True)
    x = scale * jnp.einsum("id,jd->ij", u, v_all) + bias
    positive = (jnp.arange(v_all.shape[0])[None, :] // facets) == rows[:, None]
    z = jnp.where(positive, 1.0, -1.0).astype(x.dtype)
    nll = -jax.nn.log_sigmoid(z * x)
    xs = jax.lax.stop_gradient(x)
    correct = (jnp.argmax(xs, axis=1) // facets == rows).astype(x.dtype)
    return jax.lax.psum((nll.sum(), jnp.where(positive, xs, 0.0).sum(), correct.sum()), axis)


def multi_positive_sigmoid_loss(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array, bias: jax.Array, *,
                                mesh: Mesh, axis: str | tuple[str, ...] = BATCH_AXES
                                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss of the module docstring for B images (B, D) and B*K record-major texts (B*K, D)."""
    batch, texts = image_emb.shape[0], text_emb.shape[0]
    if texts % batch:
        raise ValueError(f"multi_positive_sigmoid: {texts} texts are not K per image for {batch} images")
    facets = texts // batch
    dtype = jnp.promote_types(image_emb.dtype, jnp.float32)
    scale, bias = jnp.asarray(scale, dtype), jnp.asarray(bias, dtype)
    row = P(axis)
    nll, pos, correct = jax.shard_map(
        lambda u, v, s, b: _local_sums(u, v, s, b, axis=axis, facets=facets),
        mesh=mesh, in_specs=(row, row, P(), P()), out_specs=P(),
    )(image_emb.astype(dtype), text_emb.astype(dtype), scale, bias)
    loss = nll / texts
    return loss, {"loss": loss, "logit_scale": jax.lax.stop_gradient(scale), "bias": jax.lax.stop_gradient(bias),
                  "pos_logit": pos / texts, "i2t_acc": correct / batch, "facets": jnp.asarray(facets, dtype)}


class MultiPositiveSigmoid(SigLIP):
    """``objective.name="multi_positive_sigmoid"``: :func:`multi_positive_sigmoid_loss` with a learnable bias."""

    name = "multi_positive_sigmoid"
    supports_soft_targets = False

    def __init__(self, mesh: Mesh | None, *, bias_init: float = -10.0, chunk_size: int = 0):
        if chunk_size:
            raise ValueError("objective.name='multi_positive_sigmoid' has no chunked form: set loss_chunk_size=0")
        super().__init__(mesh, bias_init=bias_init)

    def __call__(self, inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        return multi_positive_sigmoid_loss(inputs.image_emb, inputs.text_emb, inputs.scale, inputs.params["bias"],
                                           mesh=self.mesh)
