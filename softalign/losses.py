"""Symmetric InfoNCE with PSD soft targets, computed row-sharded over the mesh's data axis.

Each device gathers the (small) B x D embeddings and builds only its own b x B logit rows, for i2t
(``s * U_local V_all^T``) and for t2i (``s * V_local U_all^T``). No device ever holds B x B. The targets are

    Y[i] = (1 - alpha) * e_i + alpha * softmax(T[i] / tau)   if i in S,  else e_i

and the loss is ``0.5 * (mean_i CE(L[i], Y_i2t[i]) + mean_j CE(L[:, j], Y_t2i[j]))`` (METHOD.md). With
``alpha = 0`` it is exactly CLIP's InfoNCE.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from softalign.losses_chunked import chunked_direction_sums
from softalign.sharding import BATCH_AXES


class TeacherTargets(NamedTuple):
    """Teacher embeddings aligned with the global batch. ``valid[j]`` says whether row j has any.

    Teacher logits are ``scale * image_emb @ text_emb.T``; rows/columns that are not valid are excluded, so a
    teacher that embedded only S gives targets spread over S.
    """

    image_emb: jax.Array  # (B, D)
    text_emb: jax.Array  # (B, D)
    scale: jax.Array  # ()
    valid: jax.Array  # (B,) bool


LOSS_METRICS = ("loss", "loss_hard", "loss_soft", "alpha", "teacher_entropy", "logit_scale", "i2t_acc", "t2i_acc")


def _direction_sums(q_local, k_all, scale, labels, in_subset, teacher_logits, tau, alpha):
    """Per-direction sums over this device's rows (queries ``q_local`` against all keys ``k_all``)."""
    logits = scale * jnp.einsum("id,jd->ij", q_local, k_all, preferred_element_type=q_local.dtype)
    logp = jax.nn.log_softmax(logits, axis=-1)
    rows = jnp.arange(q_local.shape[0])
    hard = -logp[rows, labels]
    t = jax.lax.stop_gradient(logits) if teacher_logits is None else teacher_logits
    q = jax.nn.softmax(t / tau, axis=-1)
    soft = -jnp.sum(jnp.where(q > 0, q * logp, 0.0), axis=-1)
    entropy = -jnp.sum(jax.scipy.special.xlogy(q, q), axis=-1)
    per_row = jnp.where(in_subset, (1.0 - alpha) * hard + alpha * soft, hard)
    sub = in_subset.astype(logits.dtype)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype)
    return jnp.stack([per_row.sum(), hard.sum(), (soft * sub).sum(), (entropy * sub).sum(), correct.sum(), sub.sum()])


def _teacher_logits(t_queries_local, t_keys_all, t_scale, valid_local, valid_all):
    """Teacher logit rows over the valid columns; rows without a teacher get zeros (never used, but finite)."""
    logits = t_scale * jnp.einsum("id,jd->ij", t_queries_local, t_keys_all)
    logits = jnp.where(valid_all[None, :], logits, -jnp.inf)
    return jax.lax.stop_gradient(jnp.where(valid_local[:, None], logits, 0.0))


def _chunked_local_sums(u, v, scale, alpha, labels, subset, teacher, *, tau, axis, chunk_size, ring_size):
    """Both directions with the ring + chunk loss: only local b x D blocks, never B x D or b x B."""
    # The custom_vjp returns a per-device gradient for the scale; marking it device-varying makes JAX psum it.
    scale = jax.lax.pcast(scale, axis, to="varying")
    if teacher is None:
        rows_in_s, ones = subset, jax.lax.pcast(jnp.ones(u.shape[:1], bool), axis, to="varying")
        t_i2t, t_t2i = (u, v, scale, ones), (v, u, scale, ones)
    else:
        rows_in_s = subset & teacher.valid
        t_i2t = (teacher.image_emb, teacher.text_emb, teacher.scale, teacher.valid)
        t_t2i = (teacher.text_emb, teacher.image_emb, teacher.scale, teacher.valid)
    return [chunked_direction_sums(q, k, scale, labels, rows_in_s, *t, alpha, tau, chunk_size, teacher is None,
                                   axis, ring_size) for q, k, t in ((u, v, t_i2t), (v, u, t_t2i))]


def _local_loss(u, v, scale, alpha, subset, teacher, *, tau, axis, chunk_size, ring_size):
    """Runs on one device's rows; returns replicated (loss, metric vector)."""
    b = u.shape[0]
    labels = jax.lax.axis_index(axis) * b + jnp.arange(b)
    if chunk_size > 0:
        i2t, t2i = _chunked_local_sums(u, v, scale, alpha, labels, subset, teacher, tau=tau, axis=axis,
                                       chunk_size=chunk_size, ring_size=ring_size)
        return jax.lax.psum(jnp.stack([i2t, t2i]), axis)
    u_all = jax.lax.all_gather(u, axis, tiled=True)
    v_all = jax.lax.all_gather(v, axis, tiled=True)
    if teacher is None:
        rows_in_s, t_i2t, t_t2i = subset, None, None
    else:
        ti_all = jax.lax.all_gather(teacher.image_emb, axis, tiled=True)
        tt_all = jax.lax.all_gather(teacher.text_emb, axis, tiled=True)
        valid_all = jax.lax.all_gather(teacher.valid, axis, tiled=True)
        rows_in_s = subset & teacher.valid  # a row the teacher has no embedding for keeps its one-hot target
        t_i2t = _teacher_logits(teacher.image_emb, tt_all, teacher.scale, teacher.valid, valid_all)
        t_t2i = _teacher_logits(teacher.text_emb, ti_all, teacher.scale, teacher.valid, valid_all)
    i2t = _direction_sums(u, v_all, scale, labels, rows_in_s, t_i2t, tau, alpha)
    t2i = _direction_sums(v, u_all, scale, labels, rows_in_s, t_t2i, tau, alpha)
    return jax.lax.psum(jnp.stack([i2t, t2i]), axis)


def psd_loss(
    image_emb: jax.Array,
    text_emb: jax.Array,
    scale: jax.Array,
    *,
    alpha: jax.Array | float,
    subset: jax.Array,
    teacher: TeacherTargets | None,
    tau: float,
    mesh: Mesh,
    axis: str | tuple[str, ...] = BATCH_AXES,
    chunk_size: int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PSD loss for a global batch whose rows are split over the mesh axes ``axis``. Returns ``(loss, metrics)``.

    ``subset`` (B,) bool marks S. ``teacher=None`` is the ``self`` teacher: T is the stop-gradient of the student's
    own logits. ``tau`` divides the teacher logits (the teacher's own logit scale is kept). ``chunk_size > 0``
    passes key blocks around the devices and tiles them in chunks of that size (``losses_chunked.py``):
    O(b * (chunk + D)) memory per device instead of O(b * B + B * D), same value and gradients.
    """
    batch = image_emb.shape[0]
    dtype = jnp.promote_types(image_emb.dtype, jnp.float32)  # f32, or f64 when a test enables x64
    alpha = jnp.asarray(alpha, dtype)
    scale = jnp.asarray(scale, dtype)
    row = P(axis)
    axes = axis if isinstance(axis, tuple) else (axis,)
    ring_size = int(np.prod([mesh.shape[a] for a in axes]))
    teacher_spec = None if teacher is None else TeacherTargets(row, row, P(), row)
    sums = jax.shard_map(
        lambda u, v, s, a, m, t: _local_loss(u, v, s, a, m, t, tau=tau, axis=axis, chunk_size=chunk_size,
                                             ring_size=ring_size),
        mesh=mesh,
        in_specs=(row, row, P(), P(), row, teacher_spec),
        out_specs=P(),
    )(image_emb.astype(dtype), text_emb.astype(dtype), scale, alpha, subset, teacher)
    total, hard, soft, entropy, correct, n_sub = (sums[0] + sums[1]) / 2.0
    n_sub = jnp.maximum(n_sub, 1.0)
    loss = total / batch
    metrics = {
        "loss": loss,
        "loss_hard": hard / batch,
        "loss_soft": soft / n_sub,
        "alpha": alpha,
        "teacher_entropy": entropy / n_sub,
        "logit_scale": jax.lax.stop_gradient(scale),
        "i2t_acc": sums[0, 4] / batch,
        "t2i_acc": sums[1, 4] / batch,
    }
    return loss, metrics
