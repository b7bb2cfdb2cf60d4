"""The train state and one pure, jitted train step ``(state, batch) -> (state, metrics, host_outputs)``.

Both towers, the teacher's targets, the configured objective, the gradients and the optax update run in one
``jax.jit`` with explicit ``in_shardings``/``out_shardings``; the objective itself is a ``shard_map`` that builds
only each device's b x B logit rows (see ``objectives/infonce.py``). A step whose loss or gradient is not finite
leaves params, optimizer and teacher untouched and records its step in ``state.nonfinite_step``; with
:func:`all_finite` on the state before every save, no NaN or Inf ever reaches a checkpoint. ``host_outputs`` is
what the teacher hands back to the host (the memory teacher's embeddings; ``{}`` for the others).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from absl import logging
from jax.sharding import Mesh

from softalign.models import views
from softalign.models.clip import cls_attention, text_kind
from softalign.objectives import registry, soft_targets
from softalign.objectives.aclip import AClip
from softalign.objectives.base import LossInputs, Objective, ObjectiveContext
from softalign.objectives.memory_bank import MEMORY_SEEN
from softalign.objectives.teachers import ATTENTIVE_NEEDS, Teacher
from softalign.parallel import sharding
from softalign.training import accumulate, external_teacher

OBJECTIVE_PARAMS = "objective"  # params[OBJECTIVE_PARAMS]: the objective's own leaves, when it has any
MASK_KEY_SALT = 0x464C4950  # fold_in(step key, this): the FLIP mask's key ("FLIP")
VIEW_KEY_SALT = 0x56494557  # fold_in(step key, this): A-CLIP's crop boxes ("VIEW")

PRECOMPUTED_LIMITS = ("model.text.kind='precomputed' trains without PSD or distillation teachers (psd.alpha_max=0), "
                      "with grad_accum_steps=1 and without A-CLIP's recipe: those embed tokens")
StepFn = Callable[[Any, dict[str, jax.Array]], tuple[Any, dict[str, jax.Array], dict[str, jax.Array]]]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 ()
    params: Any
    opt_state: Any
    teacher: Any
    rng: jax.Array  # uint32 (2,) raw PRNG key data, so checkpoints stay plain arrays
    nonfinite_step: jax.Array  # int32 (), -1 while every step so far was finite


def with_objective_params(model_params: Any, objective: Objective) -> Any:
    """The trainable params: the model's, plus ``objective`` leaves when the objective has any."""
    extra = objective.init_params()
    return {**model_params, OBJECTIVE_PARAMS: extra} if extra else model_params


def split_params(params: Any) -> tuple[Any, dict[str, jax.Array]]:
    """``(model params, objective params)`` from the trainable params."""
    if isinstance(params, dict) and OBJECTIVE_PARAMS in params:
        return {k: v for k, v in params.items() if k != OBJECTIVE_PARAMS}, params[OBJECTIVE_PARAMS]
    return params, {}


def create_state(params: Any, tx: optax.GradientTransformation, teacher: Teacher, seed: int,
                 teacher_inputs: Any = None) -> TrainState:
    """A fresh train state at step 0; `teacher_inputs` (``teacher.init_inputs()``) are passed to its init."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        teacher=teacher.init(params) if teacher_inputs is None else teacher.init(params, teacher_inputs),
        rng=jax.random.key_data(jax.random.key(seed, impl="threefry2x32")),
        nonfinite_step=jnp.full((), -1, jnp.int32),
    )


def _select(keep_new: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(keep_new, n, o), new, old)


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """Whether every floating leaf of ``tree`` is finite (a scalar bool), in one pass.

    The train loop calls it on the params and optimizer state before every checkpoint and log point, outside the
    step: inside it, the extra reduction changed XLA's fusion of the step (its gradient norm moved in the last
    bits, and so every later number of a bfloat16 run), cost a params-sized copy per step, and doubled the tiny
    test model's compile time.
    """
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return jnp.bool_(True)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()


def make_train_step(
    *,
    model: Any,
    tx: optax.GradientTransformation,
    lr_schedule: optax.Schedule,
    teacher: Teacher,
    objective: Objective,
    psd_config: Any,
    num_steps: int,
    mesh: Mesh,
    batch_size: int,
    grad_accum_steps: int = 1,
) -> StepFn:
    """Builds the (not yet jitted) step function. See :func:`jit_train_step`.

    With a ``host_memory`` teacher the batch must carry the bank's rows (``memory_image``/``memory_text``/
    ``memory_seen``), and the step's third output is ``{"index", "image", "text"}`` of the batch (replicated),
    which the caller hands to ``MemoryBank.stage``.
    """
    ramp_end = psd_config.ramp_end if psd_config.ramp_end >= 0 else num_steps
    alpha_fn = soft_targets.alpha_schedule(psd_config.alpha_max, psd_config.ramp, psd_config.ramp_start, ramp_end)
    groups = soft_targets.resolve_groups(psd_config.subset_groups, batch_size)  # never the mesh: elastic resume
    soft_targets.subset_layout(batch_size, psd_config.subset_fraction, groups)  # validates early
    use_teacher = objective.supports_soft_targets and (getattr(objective, "always_teacher", False) or (
        psd_config.alpha_max > 0 and psd_config.subset_fraction > 0))  # always_teacher: e.g. distill's
    shards = sharding.num_batch_shards(mesh)
    if use_teacher and groups % shards:
        logging.info("psd: S has %d strata, not a multiple of the %d data shards: the teacher's subset gather "
                     "crosses devices (same S, slower; set psd.subset_groups to a multiple of %d to keep it local)",
                     groups, shards, shards)

    def embed(params, images, tokens):
        return model.apply({"params": split_params(params)[0]}, images, tokens)

    mask_ratio = float(model.config.vision.get("mask_ratio", 0.0)) if hasattr(model, "config") else 0.0
    # the text tower's input: tokens, or (B, K, D_in) precomputed embeddings (their B*K facets come out record-major)
    text_key = "text_embedding" if hasattr(model, "config") and text_kind(model.config) == "precomputed" else "tokens"
    recipe = objective if isinstance(objective, AClip) else None  # A-CLIP's views and self-supervised terms
    if text_key != "tokens" and (grad_accum_steps > 1 or use_teacher or recipe is not None):
        raise ValueError(PRECOMPUTED_LIMITS)
    if mask_ratio > 0 and grad_accum_steps > 1:  # every micro-batch would reuse one mask key
        raise ValueError("model.vision.mask_ratio > 0 does not support grad_accum_steps > 1 yet")

    attentive = mask_ratio > 0 and model.config.vision.get("mask", "random") == "attentive"
    # FLIP's unmasked tuning: the schedule's last steps see every patch (one program; lax.cond picks the branch)
    unmask_last = int(model.config.vision.get("unmask_last_steps", 0)) if mask_ratio > 0 and not attentive else 0
    if attentive and not (use_teacher and teacher.provides_attention):
        raise ValueError(ATTENTIVE_NEEDS)

    block = int(model.config.vision.get("mask_block", 1)) if attentive else 1

    def attentive_inputs(key, teacher_params, images):
        """A-CLIP: the student's images, the patches each keeps, and what the recipe's terms read (or None)."""
        model_params, objective_params = split_params(jax.lax.stop_gradient(teacher_params))
        attention, pooled = cls_attention(model, model_params, images)  # the teacher on the full images
        if recipe is None or recipe.views == 1:
            keep = views.block_keep(attention, mask_ratio, block)
        else:
            images, keep = views.attentive_views(jax.random.fold_in(key, VIEW_KEY_SALT), images, attention,
                                                 recipe.views, recipe.crop_scale, recipe.crop_ratio, mask_ratio, block)
        target = None if recipe is None else recipe.byol_target(objective_params, pooled)
        return images, keep, ({} if target is None else {"byol_target": target})

    def student_embed(mask_key, keep=None):
        """The student's towers: FLIP's patch masking when mask_ratio > 0 (teachers keep ``embed``, unmasked);
        ``keep``: A-CLIP's patches."""
        if mask_ratio <= 0:
            return embed
        return lambda params, images, tokens: model.apply(
            {"params": split_params(params)[0]}, images, tokens, train=True, keep=keep, rngs={"mask": mask_key})

    def step_fn(state: TrainState, batch: dict[str, jax.Array]):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng, impl="threefry2x32"), state.step)
        subset_idx, subset_mask = soft_targets.draw_subset(key, batch_size, psd_config.subset_fraction, groups)
        alpha = alpha_fn(state.step)
        teacher_state = teacher.prepare(state.teacher, state.params, state.step) if use_teacher else state.teacher
        targets = teacher.targets(teacher_state, batch, subset_idx, embed) if use_teacher else None
        if not use_teacher:
            subset_mask = jnp.zeros_like(subset_mask)
        keep, images, features = None, batch["image"], None
        if attentive:  # A-CLIP: the patches the teacher's [cls] attends to most, on the full images
            images, keep, features = attentive_inputs(key, teacher_state["params"], images)
        # masks and views draw from their own streams, folded from the step key: S is the same with and without
        student = student_embed(jax.random.fold_in(key, MASK_KEY_SALT) if mask_ratio > 0 else None, keep)

        def loss_of_embeddings(img, txt, scale, objective_params, features=None):
            t = targets
            if t is not None and teacher.student_scale:  # e.g. memory: T = s * U_old V_old^T, s the student's
                t = t._replace(scale=jax.lax.stop_gradient(scale).astype(jnp.float32))
            inputs = LossInputs(img, txt, scale, objective_params, t, subset_mask, jnp.asarray(alpha), batch, features)
            loss, metrics = objective(inputs)
            if teacher.host_memory:
                metrics = dict(metrics, memory_seen=jnp.mean(batch[MEMORY_SEEN].astype(jnp.float32)))
            host = teacher.host_outputs(img, txt, batch)  # the embeddings this loss used (aux: no gradient)
            return loss, (metrics, host)

        if grad_accum_steps > 1:
            (loss, (metrics, host)), grads, objective_grads = accumulate.cached_feature_grads(
                student, loss_of_embeddings, state.params, batch["image"], batch["tokens"], grad_accum_steps, mesh,
                split=split_params)
            if objective_grads:
                grads = {**grads, OBJECTIVE_PARAMS: objective_grads}
        else:
            def loss_fn(p, student=student):
                if recipe is None:
                    return loss_of_embeddings(*student(p, images, batch[text_key]), split_params(p)[1])
                # A-CLIP's recipe: the views' embeddings and pooled features, for its terms
                model_params, objective_params = split_params(p)
                img, pooled = model.apply({"params": model_params}, images, keep=keep, method=model.image_features)
                txt = model.apply({"params": model_params}, batch["tokens"], method=model.encode_text)
                scale = model.apply({"params": model_params}, method=model.clamped_logit_scale)
                return loss_of_embeddings(img, txt, scale, objective_params, dict(features, pooled=pooled))

            if unmask_last:
                (loss, (metrics, host)), grads = jax.lax.cond(
                    state.step >= num_steps - unmask_last,
                    lambda p: jax.value_and_grad(functools.partial(loss_fn, student=embed), has_aux=True)(p),
                    lambda p: jax.value_and_grad(loss_fn, has_aux=True)(p), state.params)
            else:
                (loss, (metrics, host)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_teacher = teacher.update(teacher_state, params, state.step) if use_teacher else teacher_state

        # An overflowing update (a huge learning rate) can still give Inf parameters from a finite loss and gradient:
        # the loop checks the params and optimizer state with `all_finite` before any checkpoint.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = state.replace(
            step=state.step + 1,
            params=_select(finite, params, state.params),
            opt_state=_select(finite, opt_state, state.opt_state),
            teacher=_select(finite, new_teacher, state.teacher),
            nonfinite_step=jnp.where(finite | (state.nonfinite_step >= 0), state.nonfinite_step, state.step),
        )
        metrics = dict(metrics, grad_norm=grad_norm, learning_rate=lr_schedule(state.step))
        return new_state, metrics, host

    return step_fn


def build_train_step(config: Any, *, model: Any, mesh: Mesh, tx: optax.GradientTransformation,
                     lr_schedule: optax.Schedule) -> tuple[StepFn, Teacher, Objective]:
    """The step for a resolved config: ``(step_fn, teacher, objective)``, the teacher and objective built from
    ``config.psd`` and ``config.objective`` through the registries."""
    objective = registry.make_objective(ObjectiveContext(config, mesh, config.batch_size))
    own = getattr(objective, "teacher", None)  # an objective with a teacher of its own (distill's, loaded here)
    teacher = registry.make_teacher(config.psd) if own is None else external_teacher.attach(own, config)
    step_fn = make_train_step(model=model, tx=tx, lr_schedule=lr_schedule, teacher=teacher, objective=objective,
                              psd_config=config.psd, num_steps=config.num_steps, mesh=mesh,
                              batch_size=config.batch_size, grad_accum_steps=config.grad_accum_steps)
    return step_fn, teacher, objective


def jit_train_step(step_fn: StepFn, mesh: Mesh, state_shardings: Any) -> StepFn:
    """Jits the step with the state's shardings, the batch sharded over ``data`` and the state donated."""
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh), sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
