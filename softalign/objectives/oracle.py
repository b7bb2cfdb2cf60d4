"""The ``oracle`` teacher (synthetic source only): soft targets from the exact ground truth, not from a model.

Row i of the i2t target is uniform over the batch's captions that are true of image i, and row j of the t2i
target uniform over the images that caption j is true of (``data/scene_truth.py``). Uniform because it is the
least-committal distribution the truth allows: it says which pairs are right and nothing about which is more
right, and it is the same distribution ``objective.multi_positive`` uses as its hard target, so the two differ
only in how the target is mixed in (PSD's alpha and S). The targets go to the loss as ``log_targets`` (0 where
true, -inf elsewhere): no forward pass and no state. A row with nothing true in the batch (its caption was
swapped and nothing else fits) keeps its one-hot target, like a row outside S.
"""

from __future__ import annotations

import jax.numpy as jnp

from softalign.data import scene_truth
from softalign.objectives.base import TeacherTargets
from softalign.objectives.teachers import Teacher


def oracle_log_targets(scene: jnp.ndarray, caption: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``(i2t, t2i)`` log-targets (B, B) float32: 0 where the pair is true, -inf where it is not."""
    g = scene_truth.compatibility(caption, scene, xp=jnp)   # (B images, B captions)
    log = jnp.where(g, 0.0, -jnp.inf).astype(jnp.float32)
    return log, log.T


class OracleTeacher(Teacher):
    """Targets uniform over the batch's compatible items (module docstring)."""

    name = "oracle"
    needs_truth = True
    log_targets = True

    def targets(self, state, batch, subset_idx, embed):
        truth = scene_truth.batch_truth(batch)
        if truth is None:
            raise ValueError("psd.teacher='oracle' needs the synthetic source's ground truth (data.source="
                             "'synthetic'); this batch has none")
        size = truth[0].shape[0]
        empty = jnp.zeros((size, 0), jnp.float32)
        return TeacherTargets(empty, empty, jnp.ones((), jnp.float32), jnp.ones((size,), bool),
                              log_targets=oracle_log_targets(truth[0], truth[1]))
