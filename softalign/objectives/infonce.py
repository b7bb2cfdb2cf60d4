"""Symmetric InfoNCE with PSD soft targets, computed row-sharded over the mesh's data axis.

Each device gathers the (small) B x D embeddings and builds only its own b x B logit rows, for i2t
(``s * U_local V_all^T``) and for t2i (``s * V_local U_all^T``). No device ever holds B x B. The targets are

    Y[i] = (1 - alpha) * e_i + alpha * softmax(T[i] / tau)   if i in S,  else e_i

and the loss is ``0.5 * (mean_i CE(L[i], Y_i2t[i]) + mean_j CE(L[:, j], Y_t2i[j]))`` (docs/method.md). With
``alpha = 0`` it is exactly CLIP's InfoNCE. ``InfoNCE`` is this loss on the objective seam (``base.py``).

On the synthetic source, whose batches carry the exact ground truth (``data/scene_truth.py``), two extras:
``objective.multi_positive`` replaces ``e_i`` by the uniform distribution over every compatible item of the batch
(a row with none has no hard term), and the target-quality metrics of ``target_quality.py`` are logged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from softalign.data import scene_truth
from softalign.objectives.base import LossInputs, ObjectiveContext, TeacherTargets
from softalign.objectives.infonce_chunked import DirectionSums, chunked_direction_sums
from softalign.objectives.target_quality import target_quality
from softalign.parallel.sharding import BATCH_AXES


def _direction_sums(q_local, k_all, scale, labels, in_subset, teacher_logits, tau, alpha, positives=None):
    """Per-direction sums over this device's rows (queries ``q_local`` against all keys ``k_all``). With
    ``positives`` (local rows x B bool) the hard target is uniform over a row's positives (none: no hard term)."""
    logits = scale * jnp.einsum("id,jd->ij", q_local, k_all, preferred_element_type=q_local.dtype)
    logp = jax.nn.log_softmax(logits, axis=-1)
    rows = jnp.arange(q_local.shape[0])
    hard = -logp[rows, labels]
    if positives is not None:
        num = jnp.sum(positives, axis=-1)
        hard = -jnp.sum(jnp.where(positives, logp, 0.0), axis=-1) / jnp.maximum(num, 1).astype(logp.dtype)
    t = jax.lax.stop_gradient(logits) if teacher_logits is None else teacher_logits
    q = jax.nn.softmax(t / tau, axis=-1)
    soft = -jnp.sum(jnp.where(q > 0, q * logp, 0.0), axis=-1)
    entropy = -jnp.sum(jax.scipy.special.xlogy(q, q), axis=-1)
    per_row = jnp.where(in_subset, (1.0 - alpha) * hard + alpha * soft, hard)
    sub = in_subset.astype(logits.dtype)
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(logits.dtype)
    return DirectionSums(per_row.sum(), hard.sum(), (soft * sub).sum(), (entropy * sub).sum(), correct.sum(),
                         sub.sum())


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


def _local_loss(u, v, scale, alpha, subset, teacher, truth, *, tau, axis, chunk_size, ring_size):
    """Runs on one device's rows; returns replicated (loss, metric vector)."""
    b = u.shape[0]
    labels = jax.lax.axis_index(axis) * b + jnp.arange(b)
    if chunk_size > 0:
        i2t, t2i = _chunked_local_sums(u, v, scale, alpha, labels, subset, teacher, tau=tau, axis=axis,
                                       chunk_size=chunk_size, ring_size=ring_size)
        return jax.lax.psum((i2t, t2i), axis)
    u_all = jax.lax.all_gather(u, axis, tiled=True)
    v_all = jax.lax.all_gather(v, axis, tiled=True)
    pos_i2t = pos_t2i = None
    if truth is not None:  # multi-positive: this device's rows of the compatibility matrix, both ways
        scene, caption = truth
        pos_i2t = scene_truth.compatibility(jax.lax.all_gather(caption, axis, tiled=True), scene, xp=jnp)
        pos_t2i = scene_truth.compatibility(caption, jax.lax.all_gather(scene, axis, tiled=True), xp=jnp).T
    rows_t2i = None
    if teacher is None:
        rows_in_s, t_i2t, t_t2i = subset, None, None
    elif teacher.log_targets is not None:  # the teacher's logits outright (rows local); empty rows stay one-hot
        has_i2t, has_t2i = (jnp.any(t > -jnp.inf, axis=-1) for t in teacher.log_targets)
        rows_in_s, rows_t2i = subset & teacher.valid & has_i2t, subset & teacher.valid & has_t2i
        # rows with no finite entry get zeros (never used, but finite, so no NaN reaches the gradient)
        t_i2t, t_t2i = (jax.lax.stop_gradient(jnp.where(h[:, None], t, 0.0))
                        for h, t in ((has_i2t, teacher.log_targets[0]), (has_t2i, teacher.log_targets[1])))
    else:
        ti_all = jax.lax.all_gather(teacher.image_emb, axis, tiled=True)
        tt_all = jax.lax.all_gather(teacher.text_emb, axis, tiled=True)
        valid_all = jax.lax.all_gather(teacher.valid, axis, tiled=True)
        rows_in_s = subset & teacher.valid  # a row the teacher has no embedding for keeps its one-hot target
        t_i2t = _teacher_logits(teacher.image_emb, tt_all, teacher.scale, teacher.valid, valid_all)
        t_t2i = _teacher_logits(teacher.text_emb, ti_all, teacher.scale, teacher.valid, valid_all)
    i2t = _direction_sums(u, v_all, scale, labels, rows_in_s, t_i2t, tau, alpha, pos_i2t)
    t2i = _direction_sums(v, u_all, scale, labels, rows_in_s if rows_t2i is None else rows_t2i, t_t2i, tau, alpha,
                          pos_t2i)
    return jax.lax.psum((i2t, t2i), axis)


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
    positives_from: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PSD loss for a global batch whose rows are split over the mesh axes ``axis``. Returns ``(loss, metrics)``.

    ``subset`` (B,) bool marks S. ``teacher=None`` is the ``self`` teacher: T is the stop-gradient of the student's
    own logits. ``tau`` divides the teacher logits (the teacher's own logit scale is kept). ``chunk_size > 0``
    passes key blocks around the devices and tiles them in chunks of that size (``infonce_chunked.py``):
    O(b * (chunk + D)) memory per device instead of O(b * B + B * D), same value and gradients.
    ``positives_from``: the synthetic ground truth ``(scene, caption)`` (``data/scene_truth.py``); given, the hard
    target is uniform over each row's compatible items (multi-positive). It and ``teacher.log_targets`` need the
    unchunked loss.
    """
    if chunk_size > 0 and (positives_from is not None or (teacher is not None and teacher.log_targets is not None)):
        raise ValueError("multi-positive targets and log-target teachers (psd.teacher=oracle) need the unchunked "
                         "loss: set loss_chunk_size=0")
    batch = image_emb.shape[0]
    dtype = jnp.promote_types(image_emb.dtype, jnp.float32)  # f32, or f64 when a test enables x64
    alpha = jnp.asarray(alpha, dtype)
    scale = jnp.asarray(scale, dtype)
    row = P(axis)
    axes = axis if isinstance(axis, tuple) else (axis,)
    ring_size = int(np.prod([mesh.shape[a] for a in axes]))
    teacher_spec = None if teacher is None else TeacherTargets(
        row, row, P(), row, None if teacher.log_targets is None else (row, row))
    truth_spec = None if positives_from is None else (row, row)
    i2t, t2i = jax.shard_map(
        lambda u, v, s, a, m, t, g: _local_loss(u, v, s, a, m, t, g, tau=tau, axis=axis, chunk_size=chunk_size,
                                                ring_size=ring_size),
        mesh=mesh,
        in_specs=(row, row, P(), P(), row, teacher_spec, truth_spec),
        out_specs=P(),
    )(image_emb.astype(dtype), text_emb.astype(dtype), scale, alpha, subset, teacher, positives_from)
    both = jax.tree.map(lambda a, b: (a + b) / 2.0, i2t, t2i)
    n_sub = jnp.maximum(both.in_subset, 1.0)
    loss = both.loss / batch
    metrics = {
        "loss": loss,
        "loss_hard": both.hard / batch,
        "loss_soft": both.soft / n_sub,
        "alpha": alpha,
        "teacher_entropy": both.entropy / n_sub,
        "logit_scale": jax.lax.stop_gradient(scale),
        "i2t_acc": i2t.correct / batch,
        "t2i_acc": t2i.correct / batch,
    }
    return loss, metrics


class InfoNCE:
    """The default objective: :func:`psd_loss` (softmax InfoNCE, with PSD's soft targets on S when alpha > 0).

    Built from ``psd.temperature``, ``loss_chunk_size`` and ``objective.multi_positive``; it has no learnable
    leaves of its own (the logit scale is the model's). On batches with the synthetic ground truth it adds the
    ``truth_*`` metrics (``target_quality.py``): ``soft_targets`` / ``noisy`` say whether the teacher's and the
    swapped-caption ones apply (from ``psd`` and ``data.caption_noise``).
    """

    name = "infonce"
    supports_soft_targets = True

    def __init__(self, mesh: Mesh, *, tau: float = 1.0, chunk_size: int = 0, multi_positive: bool = False,
                 soft_targets: bool = True, noisy: bool = False):
        if not tau > 0:
            raise ValueError(f"psd.temperature={tau} must be positive")
        if chunk_size < 0:
            raise ValueError(f"loss_chunk_size={chunk_size} must be >= 0 (0: unchunked)")
        if multi_positive and chunk_size > 0:
            raise ValueError("objective.multi_positive=True needs the unchunked loss: set loss_chunk_size=0")
        self.mesh, self.tau, self.chunk_size = mesh, float(tau), int(chunk_size)
        self.multi_positive, self.soft_targets, self.noisy = bool(multi_positive), bool(soft_targets), bool(noisy)

    @classmethod
    def from_context(cls, context: ObjectiveContext) -> "InfoNCE":
        c = context.config
        multi = bool(c.objective.get("multi_positive", False))
        if multi and c.data.get("source", "synthetic") != "synthetic":
            raise ValueError(f"objective.multi_positive=True needs the synthetic source's ground truth, not "
                             f"data.source={c.data.source!r}")
        return cls(context.mesh, tau=c.psd.temperature, chunk_size=c.loss_chunk_size, multi_positive=multi,
                   soft_targets=c.psd.alpha_max > 0 and c.psd.subset_fraction > 0,
                   noisy=float(c.data.get("caption_noise", 0.0) or 0.0) > 0)

    def init_params(self) -> dict[str, jax.Array]:
        return {}

    def __call__(self, inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        truth = scene_truth.batch_truth(inputs.batch)
        if self.multi_positive and truth is None:
            raise ValueError("objective.multi_positive=True: the batch has no ground truth (synthetic source only)")
        loss, metrics = psd_loss(inputs.image_emb, inputs.text_emb, inputs.scale, alpha=inputs.alpha,
                                 subset=inputs.subset, teacher=inputs.targets, tau=self.tau, mesh=self.mesh,
                                 chunk_size=self.chunk_size, positives_from=truth[:2] if self.multi_positive else None)
        if truth is not None:
            metrics.update(target_quality(inputs, truth, tau=self.tau, mesh=self.mesh,
                                          soft_targets=self.soft_targets, noisy=self.noisy))
        return loss, metrics
