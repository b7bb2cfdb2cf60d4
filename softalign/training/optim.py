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


def make_optimizer(optim_config: Any, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns ``(tx, lr_schedule)``: clip by global norm (if ``grad_clip > 0``), then masked AdamW."""
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
    return optax.chain(*parts), schedule
