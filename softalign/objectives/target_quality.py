"""What the training targets are worth, measured against the synthetic scenes' exact ground truth.

Logged each step (as ``train/truth_*``) when the batch carries ``data/scene_truth.py``'s fields, from the batch's
compatibility matrix ``G[i, j]`` = caption j is true of image i (both directions averaged where it applies):

  pair_true                  share of the batch's own pairs that are true (1 - the effective caption-noise rate)
  false_negative_pairs       share of off-diagonal pairs that are true: what the one-hot target pushes away
  false_negative_rows        share of rows (images and captions) with at least one such false negative
  rows_without_positive      share of rows with nothing true in the batch (multi-positive and oracle: one-hot/none)
  student_mass_compatible    the student's softmax mass on true items, mean over all rows
  teacher_mass_compatible    the teacher's soft target Q's mass on true items, mean over the rows of S that get
                             one (when soft targets are on)
  swapped_self_mass          Q's mass on the row's own caption (image), mean over the rows of S whose caption was
                             swapped by caption noise and is false of the image (when data.caption_noise > 0);
                             the one-hot target puts 1 there

Computed like the loss, row-sharded in a ``shard_map``: each device builds only its b x B rows (never B x B), so
the cost is a few b x B x D products per step, small beside the towers. Everything is stop-gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from softalign.data import scene_truth
from softalign.objectives.base import LossInputs, TeacherTargets
from softalign.parallel.sharding import BATCH_AXES


def _teacher_rows(teacher, student_logits, subset, direction, *, axis):
    """(teacher logits, rows of S that get soft targets) for one direction (0: i2t, 1: t2i), as the loss has it."""
    if teacher is None:                       # the self teacher: the student's own logits
        return student_logits, subset
    valid = subset & teacher.valid
    if teacher.log_targets is not None:
        t = teacher.log_targets[direction]
        return t, valid & jnp.any(t > -jnp.inf, axis=-1)
    queries, keys = (teacher.image_emb, teacher.text_emb) if direction == 0 else (teacher.text_emb, teacher.image_emb)
    keys = jax.lax.all_gather(keys, axis, tiled=True)
    t = teacher.scale * jnp.einsum("id,jd->ij", queries, keys)
    return jnp.where(jax.lax.all_gather(teacher.valid, axis, tiled=True)[None, :], t, -jnp.inf), valid


def _local_sums(u, v, scale, subset, teacher, scene, caption, swapped, *, tau, axis, soft, noisy):
    b = u.shape[0]
    labels = jax.lax.axis_index(axis) * b + jnp.arange(b)
    gather = lambda x: jax.lax.all_gather(x, axis, tiled=True)
    g = (scene_truth.compatibility(gather(caption), scene, xp=jnp),          # i2t rows: images here
         scene_truth.compatibility(caption, gather(scene), xp=jnp).T)        # t2i rows: captions here
    off_diagonal = jnp.arange(g[0].shape[1])[None, :] != labels[:, None]
    rows = jnp.arange(b)
    own_true = g[0][rows, labels]
    sums = {"pair_true": own_true.sum(), "fn_pairs": (g[0] & off_diagonal).sum(),
            "fn_rows": sum((gd & off_diagonal).any(-1).sum() for gd in g),
            "no_positive": sum((~gd.any(-1)).sum() for gd in g)}
    keys = (gather(v), gather(u))
    student_mass, teacher_mass, teacher_rows, swapped_mass, swapped_rows = 0.0, 0.0, 0, 0.0, 0
    for direction, (queries, gd) in enumerate(((u, g[0]), (v, g[1]))):
        logits = scale * jnp.einsum("id,jd->ij", queries, keys[direction])
        student_mass += (jax.nn.softmax(logits, axis=-1) * gd).sum()
        if soft:
            t, in_s = _teacher_rows(teacher, logits, subset, direction, axis=axis)
            q = jnp.where(in_s[:, None], jax.nn.softmax(jnp.where(in_s[:, None], t, 0.0) / tau, axis=-1), 0.0)
            teacher_mass += (q * gd).sum()
            teacher_rows += in_s.sum()
            if noisy:
                wrong = in_s & swapped & ~own_true
                swapped_mass += jnp.where(wrong, q[rows, labels], 0.0).sum()
                swapped_rows += wrong.sum()
    sums.update(student_mass=student_mass, teacher_mass=teacher_mass, teacher_rows=teacher_rows,
                swapped_mass=swapped_mass, swapped_rows=swapped_rows)
    return jax.lax.psum({k: jnp.asarray(x, jnp.float32) for k, x in sums.items()}, axis)


def target_quality(inputs: LossInputs, truth: tuple[Any, Any, Any], *, tau: float, mesh: Mesh,
                   soft_targets: bool = True, noisy: bool = True,
                   axis: str | tuple[str, ...] = BATCH_AXES) -> dict[str, jax.Array]:
    """The ``truth_*`` metrics (module docstring) for one global batch; ``truth = (scene, caption, swapped)``.
    ``soft_targets`` / ``noisy`` add the teacher's and the swapped-caption metrics."""
    sg = jax.lax.stop_gradient
    scene, caption, swapped = truth
    batch = inputs.image_emb.shape[0]
    swapped = jnp.zeros((batch,), bool) if swapped is None else swapped.astype(bool)
    teacher = None if inputs.targets is None else jax.tree.map(sg, inputs.targets)
    row = P(axis)
    teacher_spec = None if teacher is None else TeacherTargets(
        row, row, P(), row, None if teacher.log_targets is None else (row, row))
    sums = jax.shard_map(
        lambda *a: _local_sums(*a, tau=tau, axis=axis, soft=soft_targets, noisy=noisy),
        mesh=mesh, in_specs=(row, row, P(), row, teacher_spec, row, row, row), out_specs=P(),
    )(sg(inputs.image_emb).astype(jnp.float32), sg(inputs.text_emb).astype(jnp.float32),
      sg(jnp.asarray(inputs.scale, jnp.float32)), inputs.subset, teacher, scene, caption, swapped)
    out = {"truth_pair_true": sums["pair_true"] / batch,
           "truth_false_negative_pairs": sums["fn_pairs"] / max(batch * (batch - 1), 1),
           "truth_false_negative_rows": sums["fn_rows"] / (2 * batch),
           "truth_rows_without_positive": sums["no_positive"] / (2 * batch),
           "truth_student_mass_compatible": sums["student_mass"] / (2 * batch)}
    if soft_targets:
        out["truth_teacher_mass_compatible"] = sums["teacher_mass"] / jnp.maximum(sums["teacher_rows"], 1.0)
        if noisy:
            out["truth_swapped_self_mass"] = sums["swapped_mass"] / jnp.maximum(sums["swapped_rows"], 1.0)
    return out
