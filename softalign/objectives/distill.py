"""TinyCLIP's affinity mimicking (Wu et al., ICCV 2023): a frozen external teacher's batch affinities as targets.

    soft = 1/2 [ CE(s U V^T, softmax(t U_t V_t^T / tau)) + CE(s V U^T, softmax(t V_t U_t^T / tau)) ]   (row means)
    loss = alpha * soft + (1 - alpha) * InfoNCE(s U V^T)

U, V: the student's unit image/text embeddings of the whole global batch, s its logit scale; U_t, V_t, t the
teacher's, from its own frozen params (``ExternalTeacher``). ``alpha`` is TinyCLIP's ``distillation_alpha``
(default 1: pure mimicking, no hard term), ``tau`` (default 1, TinyCLIP has none) divides the teacher logits.

This is exactly PSD's loss (``infonce.psd_loss``) with S = every row, alpha fixed and the teacher's own scale, so
``Distill`` is that loss with those settings, and ``loss_chunk_size > 0`` gives the ring + chunk form unchanged.
The ``psd.*`` keys do not apply to it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from softalign.models import build_model
from softalign.objectives.base import LossInputs, ObjectiveContext, TeacherTargets
from softalign.objectives.infonce import psd_loss
from softalign.objectives.teachers import Teacher


class ExternalTeacher(Teacher):
    """A frozen CLIP of its own architecture that embeds the whole batch in the train step.

    Its params live in the train state's ``teacher`` entry: outside the optimizer (never updated, never decayed,
    gradients stopped) and saved with every checkpoint, so a resumed run reads exactly the teacher it started
    with even if the teacher's workdir has trained on since. ``training/external_teacher.py`` loads them and
    calls :meth:`attach` before the state is built (objectives never read checkpoints).
    """

    name = "external"

    def __init__(self):
        self.model_config: Any = None
        self.params: Any = None
        self._model = None

    def attach(self, model_config: Any, params: Any) -> "ExternalTeacher":
        """Sets the teacher's model (a ``model`` config section) and its params (arrays); returns ``self``."""
        self.model_config, self.params = model_config, params
        self._model = build_model(model_config)
        return self

    @property
    def attached(self) -> bool:
        return self.params is not None

    def init(self, params: Any, inputs: Any = None) -> Any:
        """``{'params': the teacher's weights}``: `inputs` (traced, from :meth:`init_inputs`) or the attached ones."""
        if self.params is None:
            raise ValueError("the external teacher has no params: training/external_teacher.attach() was not called")
        return {"params": jax.tree.map(jnp.asarray, self.params if inputs is None else inputs)}

    def init_inputs(self) -> Any:
        return self.params

    def targets(self, state: Any, batch: dict[str, jax.Array], subset_idx: jax.Array, embed: Any) -> TeacherTargets:
        params = jax.lax.stop_gradient(state["params"])
        img, txt, scale = self._model.apply({"params": params}, batch["image"], batch["tokens"])
        valid = jnp.ones((img.shape[0],), bool)
        return TeacherTargets(jax.lax.stop_gradient(img).astype(jnp.float32),
                              jax.lax.stop_gradient(txt).astype(jnp.float32),
                              jax.lax.stop_gradient(scale).astype(jnp.float32), valid)


class Distill:
    """``objective.name="distill"``: affinity mimicking mixed with InfoNCE (module docstring).

    ``teacher``: the :class:`ExternalTeacher` the step uses instead of ``psd.teacher``; ``always_teacher``: the
    step runs it whatever ``psd.alpha_max`` says.
    """

    name = "distill"
    supports_soft_targets = True
    always_teacher = True

    def __init__(self, mesh: Mesh | None, *, alpha: float = 1.0, tau: float = 1.0, chunk_size: int = 0):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distill.alpha={alpha} must be in [0, 1] (1: pure affinity mimicking)")
        if not tau > 0:
            raise ValueError(f"distill.temperature={tau} must be positive")
        if chunk_size < 0:
            raise ValueError(f"loss_chunk_size={chunk_size} must be >= 0 (0: unchunked)")
        self.mesh, self.alpha, self.tau, self.chunk_size = mesh, float(alpha), float(tau), int(chunk_size)
        self.teacher = ExternalTeacher()

    @classmethod
    def from_context(cls, context: ObjectiveContext) -> "Distill":
        c = context.config
        d = c.get("distill", None)
        if d is None or not d.get("teacher", ""):
            raise ValueError("objective.name='distill' needs distill.teacher: a finished run's workdir or an "
                             "open_clip / OpenAI weight file")
        if c.psd.teacher == "memory":
            raise ValueError("objective.name='distill' brings its own teacher: psd.teacher='memory' would keep a "
                             "host bank for nothing (set psd.teacher='self')")
        return cls(context.mesh, alpha=d.alpha, tau=d.temperature, chunk_size=c.loss_chunk_size)

    def init_params(self) -> dict[str, jax.Array]:
        return {}

    def __call__(self, inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        if inputs.targets is None:
            raise ValueError("objective.name='distill' got no teacher targets (the step must run its teacher)")
        every_row = jnp.ones(inputs.image_emb.shape[:1], bool)
        loss, metrics = psd_loss(inputs.image_emb, inputs.text_emb, inputs.scale, alpha=self.alpha,
                                 subset=every_row, teacher=inputs.targets, tau=self.tau, mesh=self.mesh,
                                 chunk_size=self.chunk_size)
        metrics["teacher_scale"] = inputs.targets.scale
        return loss, metrics
