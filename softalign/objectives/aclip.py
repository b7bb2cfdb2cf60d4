"""A-CLIP's recipe around its attentive mask (Yang et al., ICCV 2023; microsoft/A-CLIP ``losses.py``), as a wrapper
of the configured objective:

    loss = mean over views v of objective(view v, text)  +  w_s · SimCLR(view 1, view 2)  +  w_b · BYOL

The wrapper owns the self-supervised heads (``models/ssl_heads.py``) as its learnable leaves,
``params["objective"]["aclip_heads"]``, so the EMA teacher holds their moving average (BYOL's EMA projector) with
no extra state. The step hands it the views' embeddings stacked view-minor (row ``V·i + v``: view v of record i),
their pooled features, and BYOL's target from the teacher's projector (``LossInputs.features``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from softalign.models.clip import l2_normalize
from softalign.models.ssl_heads import AClipHeads
from softalign.objectives.base import LossInputs, Objective

HEADS = "aclip_heads"  # params["objective"][HEADS]
PAIRS = ("views", "reference")
_MASK_VALUE = 1e9  # the reference's: subtracted from a view's similarity to itself


def simclr_loss(q_a: jax.Array, q_b: jax.Array, temperature: float) -> jax.Array:
    """SimCLR's NT-Xent (the reference's ``SIMCLRLoss``): row i of view a against view b's n rows and view a's
    other n - 1, the positive is b's row i; symmetrically for b; the mean of the two. ``q_b = q_a`` is the released
    code's call, where each row's positive is itself."""
    a, b = l2_normalize(q_a), l2_normalize(q_b)
    n = a.shape[0]
    self_mask = _MASK_VALUE * jnp.eye(n, dtype=jnp.float32)
    labels = jnp.arange(n)

    def side(x, y):
        logits = jnp.concatenate([x @ y.T / temperature, x @ x.T / temperature - self_mask], axis=1)
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[labels, labels])

    return 0.5 * (side(a, b) + side(b, a))


def byol_loss(online: jax.Array, target: jax.Array) -> jax.Array:
    """BYOL's mean ``2 - 2 cos(online_i, target_i)``; no gradient reaches ``target``."""
    cos = jnp.sum(l2_normalize(online) * l2_normalize(jax.lax.stop_gradient(target)), axis=-1)
    return jnp.mean(2.0 - 2.0 * cos)


def recipe_active(config: Any) -> bool:
    """Whether the config asks for more than the attentive mask alone (extra views or a self-supervised term)."""
    a = config.get("aclip")
    attentive = config.model.vision.get("mask", "random") == "attentive" and config.model.vision.mask_ratio > 0
    return attentive and a is not None and (a.views > 1 or a.simclr_weight > 0 or a.byol_weight > 0)


def check_recipe(config: Any) -> None:
    """ValueErrors naming the ``aclip`` key for a recipe the step cannot run."""
    a, v = config.aclip, config.model.vision
    on = a.views > 1 or a.simclr_weight > 0 or a.byol_weight > 0
    if a.views not in (1, 2):
        raise ValueError(f"aclip.views={a.views} must be 1 or 2")
    if on and not (v.get("mask", "random") == "attentive" and v.mask_ratio > 0):
        raise ValueError("aclip.views > 1 and the SimCLR/BYOL terms are A-CLIP's recipe around its attentive mask: "
                         "set model.vision.mask='attentive' and model.vision.mask_ratio > 0")
    if a.simclr_weight < 0 or a.byol_weight < 0:
        raise ValueError("aclip.simclr_weight and aclip.byol_weight must be >= 0")
    if a.simclr_pairs not in PAIRS:
        raise ValueError(f"aclip.simclr_pairs must be one of {PAIRS}, got {a.simclr_pairs!r}")
    if a.simclr_weight > 0 and a.simclr_pairs == "views" and a.views < 2:
        raise ValueError("aclip.simclr_pairs='views' contrasts two views: set aclip.views=2 (or 'reference')")
    if a.simclr_temperature <= 0 or a.head_hidden < 1 or a.head_dim < 1:
        raise ValueError("aclip.simclr_temperature, head_hidden and head_dim must be positive")
    lo, hi = a.crop_scale
    if not 0 < lo <= hi <= 1 or not 0 < a.crop_ratio[0] <= a.crop_ratio[1]:
        raise ValueError(f"aclip.crop_scale={tuple(a.crop_scale)} must satisfy 0 < lo <= hi <= 1 and crop_ratio "
                         f"{tuple(a.crop_ratio)} 0 < lo <= hi")


class AClip:
    """The wrapper: every attribute the step reads comes from the inner objective, except the loss and params."""

    def __init__(self, inner: Objective, config: Any):
        check_recipe(config)
        a = config.aclip
        self.inner, self.views = inner, int(a.views)
        self.simclr_weight, self.byol_weight = float(a.simclr_weight), float(a.byol_weight)
        self.temperature, self.pairs = float(a.simclr_temperature), a.simclr_pairs
        self.crop_scale, self.crop_ratio = tuple(a.crop_scale), tuple(a.crop_ratio)
        self.heads = AClipHeads(int(a.head_hidden), int(a.head_dim), simclr=self.simclr_weight > 0,
                                byol=self.byol_weight > 0)
        self.width, self.seed = int(config.model.vision.width), int(config.seed)

    def __getattr__(self, name: str) -> Any:  # name, supports_soft_targets, always_teacher, ...
        if name == "inner":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def has_heads(self) -> bool:
        return self.simclr_weight > 0 or self.byol_weight > 0

    def init_params(self) -> dict[str, Any]:
        params = dict(self.inner.init_params())
        if self.has_heads:  # a fixed key of the run's seed: the same heads on every host and on resume
            key = jax.random.fold_in(jax.random.key(self.seed), 0x41434C50)  # "ACLP"
            params[HEADS] = self.heads.init(key, jnp.zeros((2, self.width), jnp.float32))["params"]
        return params

    def byol_target(self, teacher_objective_params: dict[str, Any], teacher_pooled: jax.Array) -> jax.Array | None:
        """BYOL's target: the teacher's (EMA) projector on the teacher's pooled features of the full images."""
        if self.byol_weight <= 0:
            return None
        heads = jax.lax.stop_gradient(teacher_objective_params[HEADS])
        return jax.lax.stop_gradient(self.heads.apply({"params": heads}, teacher_pooled,
                                                      method=AClipHeads.byol_target))

    def __call__(self, inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]:
        own = {k: v for k, v in inputs.params.items() if k != HEADS}
        n, views = inputs.text_emb.shape[0], self.views
        per_view = inputs.image_emb.reshape(n, views, -1)
        loss, metrics = jnp.zeros((), jnp.float32), {}
        for v in range(views):
            view_loss, view_metrics = self.inner(inputs._replace(image_emb=per_view[:, v], params=own))
            loss = loss + view_loss / views
            metrics = metrics or dict(view_metrics)  # the objective's own metrics: of view 1
            if views > 1:
                metrics[f"aclip_contrast_view{v + 1}"] = view_loss
        if self.has_heads:
            features = inputs.features or {}
            out = self.heads.apply({"params": inputs.params[HEADS]}, features["pooled"])
            if self.simclr_weight > 0:
                q = out["simclr"].reshape(n, views, -1)
                simclr = simclr_loss(q[:, 0], q[:, 1] if self.pairs == "views" else q[:, 0], self.temperature)
                loss, metrics["aclip_simclr"] = loss + self.simclr_weight * simclr, simclr
            if self.byol_weight > 0:
                target = jnp.repeat(features["byol_target"], views, axis=0)
                byol = byol_loss(out["byol"], target)
                loss, metrics["aclip_byol"] = loss + self.byol_weight * byol, byol
        metrics["loss"] = loss  # the total; the objective's own part per view is aclip_contrast_view*
        return loss, metrics
