"""The train state and one pure, jitted train step ``(state, batch) -> (state, metrics)`` over a Mesh.

Both towers, the teacher's targets, the PSD loss, the gradients and the optax update run in one ``jax.jit`` with
explicit ``in_shardings``/``out_shardings``; the loss itself is a ``shard_map`` that builds only each device's
b x B logit rows (see ``losses.py``). A step whose loss or gradient is not finite leaves params, optimizer and
teacher untouched and records its step in ``state.nonfinite_step``, so no NaN ever reaches a checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from softalign import accumulate, psd, sharding
from softalign.losses import psd_loss
from softalign.memory_bank import MEMORY_OUTPUT, MEMORY_SEEN
from softalign.teachers import Teacher


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 ()
    params: Any
    opt_state: Any
    teacher: Any
    rng: jax.Array  # uint32 (2,) raw PRNG key data, so checkpoints stay plain arrays
    nonfinite_step: jax.Array  # int32 (), -1 while every loss so far was finite


def create_state(params: Any, tx: optax.GradientTransformation, teacher: Teacher, seed: int) -> TrainState:
    """A fresh train state at step 0."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        teacher=teacher.init(params),
        rng=jax.random.key_data(jax.random.key(seed, impl="threefry2x32")),
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )


def _select(keep_new: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(keep_new, n, o), new, old)


def make_train_step(
    *,
    model: Any,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    teacher: Teacher,
    psd_config: Any,
    num_steps: int,
    mesh: Mesh,
    batch_size: int,
    loss_chunk_size: int = 0,
    grad_accum_steps: int = 1,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the (not yet jitted) step function. See :func:`jit_train_step`.

    With a ``host_memory`` teacher the batch must carry the bank's rows (``memory_image``/``memory_text``/
    ``memory_seen``) and the metrics carry ``memory_write`` = ``{"index", "image", "text"}`` of the batch
    (replicated), which the caller pops and hands to ``MemoryBank.stage``.
    """
    ramp_end = psd_config.ramp_end if psd_config.ramp_end >= 0 else num_steps
    alpha_fn = psd.alpha_schedule(psd_config.alpha_max, psd_config.ramp, psd_config.ramp_start, ramp_end)
    groups = psd_config.subset_groups or sharding.num_batch_shards(mesh)
    psd.subset_layout(batch_size, psd_config.subset_fraction, groups)  # validates early
    use_teacher = psd_config.alpha_max > 0 and psd_config.subset_fraction > 0
    student_scale = getattr(teacher, "student_scale", False)
    host_memory = getattr(teacher, "host_memory", False)  # see teachers.py; the train loop owns the bank

    def embed(params, images, tokens):
        return model.apply({"params": params}, images, tokens)

    def step_fn(state: TrainState, batch: dict[str, jax.Array]):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl="threefry2x32"), state.step)
        subset_idx, subset_mask = psd.draw_subset(key, batch_size, psd_config.subset_fraction, groups)
        alpha = alpha_fn(state.step)
        teacher_state = teacher.prepare(state.teacher, state.params, state.step) if use_teacher else state.teacher
        targets = teacher.targets(teacher_state, batch, subset_idx, embed) if use_teacher else None
        if not use_teacher:
            subset_mask = jnp.zeros_like(subset_mask)

        def loss_of_embeddings(img, txt, scale):
            t = targets
            if t is not None and student_scale:  # e.g. the memory teacher: T = s * U_old V_old^T, s the student's
                t = t._replace(scale=jax.lax.stop_gradient(scale).astype(jnp.float32))
            loss, metrics = psd_loss(img, txt, scale, alpha=alpha, subset=subset_mask, teacher=t,
                                     tau=psd_config.temperature, mesh=mesh, chunk_size=loss_chunk_size)
            if host_memory:  # the embeddings this loss used go back to the host bank (aux: no gradient)
                metrics = dict(metrics, memory_seen=jnp.mean(batch[MEMORY_SEEN].astype(jnp.float32)))
                metrics[MEMORY_OUTPUT] = teacher.stored(img, txt, batch)
            return loss, metrics

        if grad_accum_steps > 1:
            (loss, metrics), grads = accumulate.cached_feature_grads(
                embed, loss_of_embeddings, state.params, batch["image"], batch["tokens"], grad_accum_steps, mesh)
        else:
            loss_fn = lambda p: loss_of_embeddings(*embed(p, batch["image"], batch["tokens"]))
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_teacher = teacher.update(teacher_state, params, state.step) if use_teacher else teacher_state

        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = state.replace(
            step=state.step + 1,
            params=_select(finite, params, state.params),
            opt_state=_select(finite, opt_state, state.opt_state),
            teacher=_select(finite, new_teacher, state.teacher),
            nonfinite_step=jnp.where(finite | (state.nonfinite_step >= 0), state.nonfinite_step, state.step),
        )
        metrics = dict(metrics, grad_norm=grad_norm, learning_rate=lr_schedule(state.step))
        return new_state, metrics

    return step_fn


def jit_train_step(step_fn: Callable, mesh: Mesh, state_shardings: Any) -> Callable:
    """Jits the step with the state's shardings, the batch sharded over ``data`` and the state donated."""
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
