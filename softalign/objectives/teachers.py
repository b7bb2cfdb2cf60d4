"""Where PSD's soft targets come from (docs/method.md, "Teachers"), behind one small interface.

A teacher owns a pytree of state that lives in the train state (and so in checkpoints). Inside the jitted step it
is asked, in order: ``prepare`` (before the loss), ``targets`` (teacher embeddings for the subset S, or ``None``
for the student's own logits) and ``update`` (after the optimizer step). :class:`Teacher` gives every method and
attribute a default, so a new teacher overrides only what it changes and is registered with one line in
``registry.TEACHERS``. Constructors validate their own knobs (``ValueError`` naming the config key).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from softalign.objectives import soft_targets
from softalign.objectives.base import TeacherTargets
from softalign.objectives.memory_bank import DTYPES, MEMORY_IMAGE, MEMORY_SEEN, MEMORY_TEXT

ATTENTIVE_NEEDS = ("model.vision.mask='attentive' reads the teacher's attention: it needs a teacher with parameters "
                   "(psd.teacher='ema' or 'snapshot') and soft targets on (psd.alpha_max > 0, psd.subset_fraction > 0)")

# (params, images, tokens) -> (image_emb, text_emb, logit_scale)
EmbedFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


class Teacher:
    """The interface every teacher implements, with defaults; all methods are traced inside the train step.

    ``student_scale``: the teacher logits use the student's current logit scale (stop-gradient), which the step
    fills in after the forward pass. ``host_memory``: the teacher reads per-record embeddings that the train loop
    adds to the batch from a host-side :class:`~softalign.objectives.memory_bank.MemoryBank`, and the step returns
    :meth:`host_outputs` as its own output for the loop to write back.
    """

    name: str = ""
    student_scale: bool = False
    host_memory: bool = False
    needs_truth: bool = False  # reads the synthetic source's ground-truth batch fields (data/scene_truth.py)
    log_targets: bool = False  # gives TeacherTargets.log_targets, which only the unchunked loss takes
    provides_attention: bool = False  # state["params"] is a model to run: A-CLIP's attentive mask can read it

    def init(self, params: Any) -> Any:
        """The teacher's state in the train state (a pytree; ``{}`` for none)."""
        return {}

    def init_inputs(self) -> Any:
        """Arrays :meth:`init` takes as its second argument, so that the jitted state init receives them as
        arguments instead of baking them into the program as constants (a frozen teacher's weights); None: none."""
        return None

    def prepare(self, state: Any, params: Any, step: jax.Array) -> Any:
        """The state to take targets from at ``step`` (before the optimizer update)."""
        return state

    def targets(self, state: Any, batch: dict[str, jax.Array], subset_idx: jax.Array,
                embed: EmbedFn) -> TeacherTargets | None:
        """Teacher embeddings for the batch (valid on S at least); ``None``: the student's own logits."""
        return None

    def update(self, state: Any, new_params: Any, step: jax.Array) -> Any:
        """The state after the optimizer step has produced ``new_params``."""
        return state

    def host_outputs(self, image_emb: jax.Array, text_emb: jax.Array,
                     batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """What the step hands back to the host for this teacher (``{}`` unless ``host_memory``)."""
        return {}


class SelfTeacher(Teacher):
    """T = stop_gradient(student logits) of the same pass: no state, no extra compute.

    At tau = 1 the soft term's gradient is exactly zero (docs/method.md); it only matters with tau != 1.
    """

    name = "self"


class _ParamsTeacher(Teacher):
    """Shared part of teachers that hold a copy of the parameters and embed S with it."""

    provides_attention = True

    def init(self, params):
        return {"params": jax.tree.map(jnp.copy, params)}

    def targets(self, state, batch, subset_idx, embed):
        images = soft_targets.gather_subset(batch["image"], subset_idx)
        tokens = soft_targets.gather_subset(batch["tokens"], subset_idx)
        params = jax.lax.stop_gradient(state["params"])
        img, txt, scale = embed(params, images, tokens)
        size = batch["image"].shape[0]
        ones = jnp.ones((img.shape[0],), bool)
        return TeacherTargets(
            image_emb=soft_targets.scatter_subset(img.astype(jnp.float32), subset_idx, size),
            text_emb=soft_targets.scatter_subset(txt.astype(jnp.float32), subset_idx, size),
            scale=jax.lax.stop_gradient(scale).astype(jnp.float32),
            valid=soft_targets.scatter_subset(ones, subset_idx, size),
        )


class EmaTeacher(_ParamsTeacher):
    """An exponential moving average of the student (momentum m), updated after every optimizer step."""

    name = "ema"

    def __init__(self, momentum: float):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"psd.ema_momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum

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


class MemoryTeacher(Teacher):
    """T = s * U_old V_old^T from the student's own embeddings of each record at its previous visit (PS-KD's
    per-sample store, carried over to pairs). No extra compute and no train-state: the embeddings live in a host
    bank (``memory_bank.py``) and arrive as batch entries; ``s`` is the student's current logit scale.

    Records never seen before are not valid: their rows keep one-hot targets and their columns get no soft mass.
    Every seen row and column counts (not only S's), since having them costs nothing.
    """

    name = "memory"
    student_scale = True
    host_memory = True

    def __init__(self, dtype: str = "float32"):
        if dtype not in DTYPES:
            raise ValueError(f"psd.memory_dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.dtype = jnp.dtype(DTYPES[dtype])

    def targets(self, state, batch, subset_idx, embed):
        return TeacherTargets(
            image_emb=batch[MEMORY_IMAGE].astype(jnp.float32),
            text_emb=batch[MEMORY_TEXT].astype(jnp.float32),
            scale=jnp.ones((), jnp.float32),  # placeholder: the step substitutes the student's scale
            valid=batch[MEMORY_SEEN].astype(bool),
        )

    def host_outputs(self, image_emb, text_emb, batch):
        """What the step returns for the bank: the batch's record indices and its student embeddings (the ones
        the loss used, stop-gradient), already in the bank's dtype so the device-to-host copy is no larger."""
        sg = jax.lax.stop_gradient
        return {"index": batch["index"], "image": sg(image_emb).astype(self.dtype),
                "text": sg(text_emb).astype(self.dtype)}
