"""Where PSD's soft targets come from (METHOD.md, "Teachers"), behind one small interface.

A teacher owns a pytree of state that lives in the train state (and so in checkpoints). Inside the jitted step it
is asked, in order: ``prepare`` (before the loss), ``targets`` (teacher embeddings for the subset S, or ``None``
for the student's own logits) and ``update`` (after the optimizer step). New teachers (``memory``, ``external``)
plug in by implementing these three methods and registering a builder in ``TEACHERS``.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import optax

from softalign import psd
from softalign.losses import TeacherTargets

# (params, images, tokens) -> (image_emb, text_emb, logit_scale)
EmbedFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


class Teacher(Protocol):
    """The interface every teacher implements; all methods are traced inside the train step."""

    name: str
    needs_forward: bool

    def init(self, params: Any) -> Any: ...

    def prepare(self, state: Any, params: Any, step: jax.Array) -> Any: ...

    def targets(
        self, state: Any, batch: dict[str, jax.Array], subset_idx: jax.Array, embed: EmbedFn
    ) -> TeacherTargets | None: ...

    def update(self, state: Any, new_params: Any, step: jax.Array) -> Any: ...


class SelfTeacher:
    """T = stop_gradient(student logits) of the same pass: no state, no extra compute.

    At tau = 1 the soft term's gradient is exactly zero (METHOD.md); it only matters with tau != 1.
    """

    name = "self"
    needs_forward = False

    def init(self, params):
        return {}

    def prepare(self, state, params, step):
        return state

    def targets(self, state, batch, subset_idx, embed):
        return None

    def update(self, state, new_params, step):
        return state


class _ParamsTeacher:
    """Shared part of teachers that hold a copy of the parameters and embed S with it."""

    needs_forward = True

    def init(self, params):
        return {"params": jax.tree.map(jnp.copy, params)}

    def targets(self, state, batch, subset_idx, embed):
        images = psd.gather_subset(batch["image"], subset_idx)
        tokens = psd.gather_subset(batch["tokens"], subset_idx)
        params = jax.lax.stop_gradient(state["params"])
        img, txt, scale = embed(params, images, tokens)
        size = batch["image"].shape[0]
        ones = jnp.ones((img.shape[0],), bool)
        return TeacherTargets(
            image_emb=psd.scatter_subset(img.astype(jnp.float32), subset_idx, size),
            text_emb=psd.scatter_subset(txt.astype(jnp.float32), subset_idx, size),
            scale=jax.lax.stop_gradient(scale).astype(jnp.float32),
            valid=psd.scatter_subset(ones, subset_idx, size),
        )


class EmaTeacher(_ParamsTeacher):
    """An exponential moving average of the student (momentum m), updated after every optimizer step."""

    name = "ema"

    def __init__(self, momentum: float):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"psd.ema_momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum

    def prepare(self, state, params, step):
        return state

    def update(self, state, new_params, step):
        return {"params": optax.incremental_update(new_params, state["params"], 1.0 - self.momentum)}


class SnapshotTeacher(_ParamsTeacher):
    """Parameters frozen at the start of each generation of ``every`` steps (PS-KD's previous-epoch teacher)."""

    name = "snapshot"

    def __init__(self, every: int):
        if every <= 0:
            raise ValueError(f"psd.snapshot_every must be positive, got {every}")
        self.every = every

    def prepare(self, state, params, step):
        refresh = (step % self.every) == 0
        return {"params": jax.tree.map(lambda p, t: jnp.where(refresh, p, t), params, state["params"])}

    def update(self, state, new_params, step):
        return state


TEACHERS: dict[str, Callable[[Any], Teacher]] = {
    "self": lambda cfg: SelfTeacher(),
    "ema": lambda cfg: EmaTeacher(cfg.ema_momentum),
    "snapshot": lambda cfg: SnapshotTeacher(cfg.snapshot_every),
}


def make_teacher(psd_config: Any) -> Teacher:
    """Builds the teacher named by ``psd_config.teacher``."""
    name = psd_config.teacher
    if name not in TEACHERS:
        raise ValueError(f"psd.teacher={name!r} is not available; choose one of {sorted(TEACHERS)}")
    return TEACHERS[name](psd_config)
