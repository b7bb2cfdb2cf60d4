"""NMTune (Chen et al. 2023, "Understanding and Mitigating the Label Noise in Pre-training on Downstream Tasks"):
a residual MLP g and a linear head h trained on frozen image features f, with three regularisers on g's output
that keep it close to the pre-trained features and spread over many directions.

For a batch of B features f (B, D) with labels y, z = g(f) = s * MLP(f) + f (s: a learned per-dimension scale,
initialised to 1) and logits h(z):

    loss = CE(h(z), y)
         + mse_weight * mean((normalize(z) - normalize(f))^2)            # over all B x D entries
         + cov_weight * sum_{i != j} C_ij^2 / D,  C = (z - mean z)^T (z - mean z) / (B - 1)
         - svd_weight * mean(sigma_1..5 / sum(sigma))                     # sigma: singular values of z

Weights default to the paper's code (1.0, 0.04, 0.001; its ``nml_tune.py``). Its spectral term is the *mean* of
the five largest normalised singular values (the sum / 5), which this follows. Differences from that code: the
MLP (one hidden layer, 4 x D, ReLU) uses LayerNorm instead of BatchNorm, and there is no weak/strong augmentation
pair (the features are embedded once, frozen, so the MSE target is f itself).

Evaluator: ``evals.<name> = {kind: 'nmtune', train: {...}, test: {...}, epochs: 30, batch_size: 64, lr: 1e-3,
weight_decay: 1e-4, hidden_ratio: 4, mse_weight: 1.0, cov_weight: 0.04, svd_weight: 0.001, seed: 0}``; reports
test top-1 and mean per-class recall.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from softalign.evaluation import base
from softalign.evaluation.datasets import load_classification

DEFAULTS = dict(epochs=30, batch_size=64, lr=1e-3, weight_decay=1e-4, hidden_ratio=4, mse_weight=1.0,
                cov_weight=0.04, svd_weight=0.001, seed=0)
TOP_K = 5  # singular values in the spectral term


class NMTuneHead(nn.Module):
    """z = scale * MLP(f) + f, logits = Dense(z)."""

    num_classes: int
    hidden_ratio: int = 4

    @nn.compact
    def __call__(self, f: jax.Array) -> tuple[jax.Array, jax.Array]:
        d = f.shape[-1]
        h = nn.relu(nn.LayerNorm()(nn.Dense(self.hidden_ratio * d)(f)))
        scale = self.param("scale", nn.initializers.ones, (1, d))
        z = scale * nn.Dense(d)(h) + f
        return z, nn.Dense(self.num_classes)(z)


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def regularizers(z: jax.Array, f: jax.Array) -> dict[str, jax.Array]:
    """The three terms on g's output z (B, D) given the frozen features f, unweighted."""
    b, d = z.shape
    mse = jnp.mean((_normalize(z) - _normalize(jax.lax.stop_gradient(f))) ** 2)
    centred = z - jnp.mean(z, axis=0)
    cov = centred.T @ centred / (b - 1)
    cov_term = (jnp.sum(cov ** 2) - jnp.sum(jnp.diag(cov) ** 2)) / d
    sigma = jnp.linalg.svd(z, compute_uv=False)
    spectral = jnp.mean((sigma / jnp.sum(sigma))[:TOP_K])
    return {"mse": mse, "cov": cov_term, "svd": spectral}


def nmtune_loss(z: jax.Array, logits: jax.Array, f: jax.Array, labels: jax.Array, *, mse_weight: float = 1.0,
                cov_weight: float = 0.04, svd_weight: float = 0.001) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total loss, its parts) for one batch (module docstring)."""
    ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    parts = regularizers(z, f)
    total = ce + mse_weight * parts["mse"] + cov_weight * parts["cov"] - svd_weight * parts["svd"]
    return total, {"ce": ce, **parts}


def fit_nmtune(train_x: np.ndarray, train_y: np.ndarray, num_classes: int, **options: Any) -> Any:
    """Trains g and h with AdamW (cosine schedule) on shuffled mini-batches; returns ``predict(x) -> labels``."""
    o = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    x, y = np.asarray(train_x, np.float32), np.asarray(train_y, np.int32)
    batch = int(min(o["batch_size"], len(x)))
    if batch < 2:
        raise ValueError("NMTune needs at least two training examples")
    steps_per_epoch = len(x) // batch
    model = NMTuneHead(num_classes, int(o["hidden_ratio"]))
    params = model.init(jax.random.key(int(o["seed"])), jnp.zeros((1, x.shape[1])))["params"]
    schedule = optax.cosine_decay_schedule(float(o["lr"]), max(1, int(o["epochs"]) * steps_per_epoch))
    tx = optax.adamw(schedule, weight_decay=float(o["weight_decay"]))
    opt_state = tx.init(params)
    weights = {k: float(o[k]) for k in ("mse_weight", "cov_weight", "svd_weight")}

    @jax.jit
    def step(params, opt_state, fb, yb):
        def loss_fn(p):
            z, logits = model.apply({"params": p}, fb)
            return nmtune_loss(z, logits, fb, yb, **weights)[0]
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(int(o["seed"]))
    for _ in range(int(o["epochs"])):
        order = rng.permutation(len(x))
        for k in range(steps_per_epoch):  # drop the last partial batch: one compiled shape
            rows = order[k * batch:(k + 1) * batch]
            params, opt_state = step(params, opt_state, x[rows], y[rows])
    predict_logits = jax.jit(lambda p, fb: model.apply({"params": p}, fb)[1])
    return lambda features: np.asarray(jnp.argmax(predict_logits(params, np.asarray(features, np.float32)), -1))


@base.register_evaluator("nmtune")
def build_nmtune(name: str, options: Any, ctx: base.EvalContext) -> base.Evaluator:
    """``evals.<name> = {kind: 'nmtune', train: {...}, test: {...}, ...}`` (module docstring)."""
    options = base.options_of(name, options, ("train", "test") + tuple(DEFAULTS))
    for key in ("train", "test"):
        if options.get(key) is None:
            raise base.ConfigError(f"evals.{name}.{key}: a classification dataset spec is required")
    splits = {key: load_classification(options[key], ctx.images, where=f"evals.{name}.{key}")
              for key in ("train", "test")}
    from softalign.evaluation.linear_probe import _align
    labels = {key: _align(splits["train"], data, f"evals.{name}.{key}") for key, data in splits.items()}
    settings = {k: options.get(k) for k in DEFAULTS}
    num_classes = len(splits["train"].classnames)

    def run(encode_image, encode_text):
        del encode_text
        feats = {}
        for key in ("train", "test"):
            emb, kept = ctx.embed_images(encode_image, splits[key].images, f"{name}: {key} images")
            feats[key] = (emb, labels[key][kept])
        predict = fit_nmtune(*feats["train"], num_classes, **settings)
        test_x, test_y = feats["test"]
        hit = predict(test_x) == test_y
        metrics = {"top1": float(np.mean(hit)),
                   "mean_per_class_recall": float(np.mean([np.mean(hit[test_y == c]) for c in np.unique(test_y)]))}
        skipped = sum(d.images.skipped for d in splits.values())
        if skipped:
            metrics["skipped_images"] = float(skipped)
        return metrics

    c = num_classes
    return base.Evaluator(name, base.every_of(options), run, {"top1": 1 / c, "mean_per_class_recall": 1 / c},
                          num_images=sum(len(d.images) for d in splits.values()))
