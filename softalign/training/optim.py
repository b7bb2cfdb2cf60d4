"""AdamW with linear warmup + cosine decay, gradient clipping, and a weight-decay mask, all from the config."""

from __future__ import annotations

from typing import Any

import jax
import optax


def learning_rate_schedule(optim_config: Any, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio``."""
    peak = optim_config.lr
    warmup = min(int(optim_config.warmup_steps), max(num_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1),
        end_value=peak * optim_config.min_lr_ratio,
    )


def weight_decay_mask(params: Any) -> Any:
    """True for matmul weights only (leaves named ``kernel``): biases, norms, embeddings and the logit scale are
    not decayed."""

    def decays(path, leaf) -> bool:
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", str(last)))
        return name == "kernel"

    return jax.tree_util.tree_map_with_path(decays, params)


FREEZABLE = ("vision", "text")  # optim.freeze: top-level params a run may lock (LiT, Zhai et al., CVPR 2022)


def frozen_labels(freeze: Any) -> Any:
    """``params -> {'frozen' | 'train'}`` per leaf: a leaf under a top-level key in ``freeze`` is frozen."""
    unknown = sorted(set(freeze) - set(FREEZABLE))
    if unknown:
        raise ValueError(f"optim.freeze={tuple(freeze)}: {unknown} cannot be frozen; choose from {FREEZABLE}")

    def labels(params):
        return {k: jax.tree.map(lambda _, k=k: "frozen" if k in freeze else "train", v) for k, v in params.items()}

    return labels


def make_optimizer(optim_config: Any, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns ``(tx, lr_schedule)``: clip by global norm (if ``grad_clip > 0``), then masked AdamW.

    ``optim.freeze`` (e.g. ``("text",)``) locks those towers: their updates are zero (``optax.set_to_zero``), so
    their params stay bit-identical, hold no Adam moments, take no weight decay and do not count in the clipped
    norm. Their gradients are still computed (the step logs the norm of all of them)."""
    schedule = learning_rate_schedule(optim_config, num_steps)
    parts = []
    if optim_config.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(optim_config.grad_clip))
    parts.append(
        optax.adamw(
            schedule,
            b1=optim_config.b1,
            b2=optim_config.b2,
            eps=optim_config.eps,
            weight_decay=optim_config.weight_decay,
            mask=weight_decay_mask,
        )
    )
    tx = optax.chain(*parts)
    freeze = tuple(optim_config.get("freeze", ()) or ())
    if freeze:
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, frozen_labels(freeze))
    return tx, schedule
