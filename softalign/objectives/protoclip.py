"""ProtoCLIP (Chen et al. 2022): InfoNCE plus a prototype loss against the memory bank's k-means prototypes.

    image->text: CE(s_p * u_i C_img<-txt^T, softmax(C_txt[y_txt(i)] C_txt^T / tau_p))
    text->image: CE(s_p * v_i C_txt<-img^T, softmax(C_img[y_img(i)] C_img^T / tau_p))
    loss = InfoNCE (with PSD's soft targets if any) + w * (i2t + t2i) / 2

over the rows with a cluster label (the record was in the bank at the last clustering); ``s_p`` is the objective's
own learnable scale (``params["objective"]["proto_logit_scale"]``, log-space, clamped at 100 like the model's).
The centroids and labels come from ``prototypes.PrototypeHook`` as batch fields (docs/method.md, "ProtoCLIP").
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from softalign.objectives import prototypes as P
from softalign.objectives.base import LossInputs, ObjectiveContext
from softalign.objectives.infonce import InfoNCE
from softalign.parallel import sharding

MAX_SCALE = 100.0


def _direction(z, student_centroids, teacher_centroids, labels, scale, tau):
    """(sum of CE over labelled rows, correct count, labelled count) for one direction."""
    valid = labels >= 0
    y = jnp.where(valid, labels, 0)
    logp = jax.nn.log_softmax(scale * jnp.einsum("bd,kd->bk", z, student_centroids), axis=-1)
    teacher = jnp.einsum("bd,kd->bk", teacher_centroids[y], teacher_centroids) / tau
    q = jax.lax.stop_gradient(jax.nn.softmax(teacher, axis=-1))
    ce = -jnp.sum(q * logp, axis=-1)
    v = valid.astype(logp.dtype)
    correct = (jnp.argmax(logp, axis=-1) == labels).astype(logp.dtype)
    return jnp.sum(ce * v), jnp.sum(correct * v), jnp.sum(v)


def prototype_loss(image_emb, text_emb, scale, batch, *, tau):
    """``(loss, metrics)`` of the prototype term (the mean of both directions over their labelled rows)."""
    dtype = jnp.promote_types(image_emb.dtype, jnp.float32)
    f = {k: jnp.asarray(batch[k], dtype) for k in P.CENTROID_FIELDS}
    scale = jnp.asarray(scale, dtype)
    i2t = _direction(image_emb.astype(dtype), f[P.IMAGE_FROM_TEXT], f[P.TEXT_CENTROIDS], batch[P.TEXT_LABEL],
                     scale, tau)
    t2i = _direction(text_emb.astype(dtype), f[P.TEXT_FROM_IMAGE], f[P.IMAGE_CENTROIDS], batch[P.IMAGE_LABEL],
                     scale, tau)
    per = [s / jnp.maximum(n, 1.0) for s, _, n in (i2t, t2i)]
    loss = 0.5 * (per[0] + per[1])
    n = image_emb.shape[0]
    return loss, {"proto_loss": loss, "proto_i2t_acc": i2t[1] / jnp.maximum(i2t[2], 1.0),
                  "proto_t2i_acc": t2i[1] / jnp.maximum(t2i[2], 1.0), "proto_labelled": (i2t[2] + t2i[2]) / (2 * n)}


class ProtoCLIP:
    """``objective.name="protoclip"``: :class:`InfoNCE` plus ``objective.proto_weight`` x the prototype loss."""

    name = "protoclip"
    supports_soft_targets = True  # the InfoNCE part takes PSD's targets as usual

    def __init__(self, infonce: InfoNCE, shards: int, *, num_prototypes: int, episode_steps: int, weight: float,
                 temperature: float, scale_init: float):
        if num_prototypes < 2:
            raise ValueError(f"objective.num_prototypes={num_prototypes} must be >= 2")
        if num_prototypes % shards:
            raise ValueError(f"objective.num_prototypes={num_prototypes} must be a multiple of the {shards} data "
                             "shards (the centroids travel batch-sharded)")
        if episode_steps <= 0:
            raise ValueError(f"objective.episode_steps={episode_steps} must be positive")
        if not weight >= 0:
            raise ValueError(f"objective.proto_weight={weight} must be >= 0")
        if not temperature > 0:
            raise ValueError(f"objective.proto_temperature={temperature} must be positive")
        if not 0 < scale_init <= MAX_SCALE:
            raise ValueError(f"objective.proto_scale_init={scale_init} must be in (0, {MAX_SCALE}]")
        self.infonce, self.k, self.episode_steps = infonce, int(num_prototypes), int(episode_steps)
        self.weight, self.tau, self.scale_init = float(weight), float(temperature), float(scale_init)

    @classmethod
    def from_context(cls, context: ObjectiveContext) -> "ProtoCLIP":
        c = context.config
        if c.psd.teacher != "memory":
            raise ValueError(f"objective.name='protoclip' clusters the memory teacher's bank: set "
                             f"psd.teacher='memory' (psd.alpha_max=0 for no soft targets), not {c.psd.teacher!r}")
        o = c.objective
        # config.checks builds without a mesh, from the shard count it is given
        shards = context.num_data_shards if context.mesh is None else sharding.num_batch_shards(context.mesh)
        return cls(InfoNCE.from_context(context), shards, num_prototypes=o.num_prototypes,
                   episode_steps=o.episode_steps, weight=o.proto_weight, temperature=o.proto_temperature,
                   scale_init=o.proto_scale_init)

    def init_params(self) -> dict[str, jax.Array]:
        return {"proto_logit_scale": jnp.asarray(math.log(self.scale_init), jnp.float32)}

    def __call__(self, inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        missing = [k for k in (*P.CENTROID_FIELDS, P.IMAGE_LABEL, P.TEXT_LABEL) if k not in inputs.batch]
        if missing:
            raise ValueError(f"objective.name='protoclip': the batch lacks {missing} (the train loop's prototype "
                             f"hook adds them)")
        loss, metrics = self.infonce(inputs)
        scale = jnp.minimum(jnp.exp(inputs.params["proto_logit_scale"]), MAX_SCALE)
        proto, proto_metrics = prototype_loss(inputs.image_emb, inputs.text_emb, scale, inputs.batch, tau=self.tau)
        total = loss + self.weight * proto
        return total, {**metrics, **proto_metrics, "loss": total, "loss_infonce": loss,
                       "proto_scale": jax.lax.stop_gradient(scale)}
