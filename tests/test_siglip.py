"""SigLIP's sigmoid loss: a float64 NumPy reference, chunked ring == unchunked, and the train step with its bias."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_config

from softalign.config.checks import validate
from softalign.config.errors import ConfigError
from softalign.models import build_model
from softalign.objectives import siglip
from softalign.parallel import sharding
from softalign.parallel.sharding import make_mesh
from softalign.training.optim import make_optimizer
from softalign.training.step import (
    OBJECTIVE_PARAMS,
    build_train_step,
    create_state,
    jit_train_step,
    with_objective_params,
)

# Jitted once per (mesh, chunk): eager shard_map would run op by op.
sigmoid_loss = jax.jit(siglip.sigmoid_loss, static_argnames=("mesh", "axis", "chunk_size"))


def reference(u, v, s, b):
    """The loss, its metrics and its gradients (u, v, s, b) with full B x B matrices in float64."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    B = len(u)
    dots = u @ v.T
    x = s * dots + b
    z = 2 * np.eye(B) - 1
    loss = np.logaddexp(0.0, -z * x).sum() / B
    G = (1 / (1 + np.exp(-x)) - np.eye(B)) / B  # d loss / d x = (sigmoid(x) - y) / B
    grads = (s * G @ v, s * G.T @ u, (G * dots).sum(), G.sum())
    idx = np.arange(B)
    metrics = {"loss": loss, "i2t_acc": np.mean(x.argmax(1) == idx), "t2i_acc": np.mean(x.argmax(0) == idx),
               "pos_logit": np.trace(x) / B, "neg_logit": (x.sum() - np.trace(x)) / (B * (B - 1)),
               "logit_scale": s, "bias": b}
    return loss, metrics, grads


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(B=16, D=8, seed=0, noise=0.8):
    """Texts near their images, so about half the pairs are each other's argmax (the accuracies are tested)."""
    rng = np.random.default_rng(seed)
    u = _unit(rng.normal(size=(B, D)))
    return u.astype(np.float32), _unit(u + noise * rng.normal(size=(B, D))).astype(np.float32)


def _value_and_grads(mesh, chunk, *args):
    f = lambda u, v, s, b: sigmoid_loss(u, v, s, b, mesh=mesh, chunk_size=chunk)
    return jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(*args)


@pytest.mark.parametrize("devices,chunk", [(1, 0), (2, 0), (8, 0), (1, 5), (8, 3)])
def test_loss_metrics_and_gradients_match_float64_numpy(devices, chunk):
    u, v = _inputs(seed=1)
    loss, metrics, grads = reference(u, v, 7.0, -2.5)
    assert 0.2 < metrics["i2t_acc"] < 0.9 and 0.2 < metrics["t2i_acc"] < 0.9 and metrics["i2t_acc"] != 1 / 16
    with jax.enable_x64(True):
        args = (jnp.asarray(u, jnp.float64), jnp.asarray(v, jnp.float64), jnp.float64(7.0), jnp.float64(-2.5))
        (value, m), g = _value_and_grads(make_mesh(devices), chunk, *args)
        assert value.dtype == jnp.float64
        np.testing.assert_allclose(value, loss, rtol=1e-12)
        for k in metrics:
            np.testing.assert_allclose(m[k], metrics[k], rtol=1e-12, atol=1e-14, err_msg=k)
        for name, a, b in zip("u v scale bias".split(), g, grads):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14, err_msg=name)


@pytest.mark.parametrize("devices,chunk", [(1, 5), (1, 64), (2, 3), (2, 8), (8, 2), (8, 3)])
def test_chunked_ring_equals_unchunked_in_value_and_gradients(devices, chunk):
    """float32; chunk sizes that do and do not divide the per-device block (padded, masked)."""
    mesh = make_mesh(devices)
    u, v = _inputs(B=16, seed=2)
    args = (u, v, jnp.float32(10.0), jnp.float32(-10.0))
    (l0, m0), g0 = _value_and_grads(mesh, 0, *args)
    (lc, mc), gc = _value_and_grads(mesh, chunk, *args)
    np.testing.assert_allclose(lc, l0, rtol=1e-6)
    for k in m0:
        np.testing.assert_allclose(mc[k], m0[k], rtol=1e-6, atol=1e-6, err_msg=k)
    for a, b in zip(g0, gc):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_chunked_form_never_holds_b_by_B_or_B_by_D():
    """8 devices, B = 48, b = 6, D = 5: the unchunked form has the 6 x 48 block and the 48 x 5 gather; the
    chunked ring form (c = 4) has neither."""
    mesh = make_mesh(8)
    row = sharding.batch_sharding(mesh)
    emb = jax.ShapeDtypeStruct((48, 5), jnp.float32, sharding=row)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)

    def hlo(chunk):
        f = jax.grad(lambda u, v, s, b: siglip.sigmoid_loss(u, v, s, b, mesh=mesh, chunk_size=chunk)[0],
                     argnums=(0, 1, 2, 3))
        return jax.jit(f).lower(emb, emb, scalar, scalar).compile().as_text()

    full, chunked = hlo(0), hlo(4)
    assert "f32[6,48]" in full and "f32[48,5]" in full
    assert "f32[6,48]" not in chunked and "f32[48,5]" not in chunked and "f32[48,6]" not in chunked
    assert "f32[6,4]" in chunked


def test_config_rejects_soft_targets_and_a_bad_bias():
    ok = tiny_config(**{"objective.name": "siglip", "psd.alpha_max": 0.0})
    validate(ok, num_data_shards=8)
    with pytest.raises(ConfigError, match="psd.alpha_max=0"):
        validate(tiny_config(**{"objective.name": "siglip", "psd.alpha_max": 0.5}), num_data_shards=8)
    with pytest.raises(ConfigError, match="siglip_bias_init"):
        validate(tiny_config(**{"objective.name": "siglip", "psd.alpha_max": 0.0,
                                "objective.siglip_bias_init": math.nan}), num_data_shards=8)


B = 40  # 5 rows per device on 8 devices
STEPS = 10


def _train(devices, chunk):
    """STEPS jitted steps on one fixed batch; returns (losses, metrics of the last step, params after 2 and at
    the end, initial bias)."""
    c = tiny_config(**{"objective.name": "siglip", "psd.alpha_max": 0.0, "psd.teacher": "self",
                       "model.logit_scale_init": 10.0, "batch_size": B, "num_steps": STEPS, "loss_chunk_size": chunk})
    c.model.text.update(vocab_size=50, eot_id=2, context_length=8)
    model = build_model(c.model)
    tx, lr = make_optimizer(c.optim, c.num_steps)
    mesh = make_mesh(devices)
    step_fn, teacher, objective = build_train_step(c, model=model, mesh=mesh, tx=tx, lr_schedule=lr)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(B, 8, 8, 3)).astype(np.float32),
             "tokens": np.concatenate([np.ones((B, 1)), rng.integers(3, 50, (B, 5)), np.full((B, 1), 2),
                                       np.zeros((B, 1))], 1).astype(np.int32),
             "index": np.arange(B, dtype=np.int32)}
    params = model.init(jax.random.key(0), batch["image"][:1], batch["tokens"][:1])["params"]
    state = create_state(with_objective_params(params, objective), tx, teacher, 0)
    bias0 = float(state.params[OBJECTIVE_PARAMS]["bias"])
    shardings = sharding.state_sharding(mesh, state)
    step = jit_train_step(step_fn, mesh, shardings)
    state = jax.device_put(state, shardings)
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    losses, after2 = [], None
    for i in range(STEPS):
        state, metrics, _ = step(state, batch)
        losses.append(float(metrics["loss"]))
        if i == 1:
            after2 = jax.device_get(state.params)
    return np.array(losses), jax.device_get(metrics), after2, jax.device_get(state.params), bias0


@pytest.fixture(scope="module")
def runs():
    return _train(1, 0), _train(8, 2)  # 8 devices with the chunked ring (chunk 2 does not divide b = 5)


def test_train_step_learns_and_trains_the_bias(runs):
    losses, metrics, _, params, bias0 = runs[0]
    assert bias0 == -10.0
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
    assert params[OBJECTIVE_PARAMS]["bias"] != bias0  # the bias is a trained leaf (it gets no weight decay)
    assert metrics["bias"] != bias0  # the metric is the bias the last step started from
    assert {"loss", "logit_scale", "bias", "i2t_acc", "t2i_acc", "pos_logit", "neg_logit"} <= set(metrics)
    np.testing.assert_allclose(metrics["logit_scale"], 10.0, rtol=0.05)  # started at SigLIP's 10


def test_sharded_chunked_step_equals_single_device_step(runs):
    (l1, _, p1_2, p1, _), (l8, _, p8_2, p8, _) = runs
    np.testing.assert_allclose(l8[:2], l1[:2], rtol=1e-5)
    np.testing.assert_allclose(l8, l1, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p1_2), jax.tree.leaves(p8_2)):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(p8[OBJECTIVE_PARAMS]["bias"], p1[OBJECTIVE_PARAMS]["bias"], rtol=1e-5)
