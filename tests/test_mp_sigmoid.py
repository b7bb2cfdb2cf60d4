"""FLAME's multi-positive sigmoid loss vs float64 NumPy, sharded = single-device, K = 1 is SigLIP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softalign.objectives import siglip
from softalign.objectives.mp_sigmoid import multi_positive_sigmoid_loss
from softalign.parallel.sharding import make_mesh

loss_fn = jax.jit(multi_positive_sigmoid_loss, static_argnames=("mesh", "axis"))


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference(u, v, s, b):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    B, BK = len(u), len(v)
    x = s * u @ v.T + b
    z = np.where(np.arange(BK)[None, :] // (BK // B) == np.arange(B)[:, None], 1.0, -1.0)
    return np.logaddexp(0.0, -z * x).sum() / BK  # -log sigmoid(t) = log(1 + e^-t)


def _data(B, K, D=6, seed=0):
    rng = np.random.default_rng(seed)
    return _unit(rng.normal(size=(B, D))).astype(np.float32), _unit(rng.normal(size=(B * K, D))).astype(np.float32)


@pytest.mark.parametrize("K", [1, 3])
def test_matches_numpy_and_sharding(K):
    u, v = _data(16, K)
    args = (u, v, jnp.float32(10.0), jnp.float32(-5.0))
    (l1, m1), g1 = jax.value_and_grad(lambda *a: loss_fn(*a, mesh=make_mesh(1)), argnums=(0, 1, 2, 3),
                                      has_aux=True)(*args)
    (l8, m8), g8 = jax.value_and_grad(lambda *a: loss_fn(*a, mesh=make_mesh(8)), argnums=(0, 1, 2, 3),
                                      has_aux=True)(*args)
    np.testing.assert_allclose(float(l1), reference(u, v, 10.0, -5.0), rtol=1e-5)
    np.testing.assert_allclose(float(l8), float(l1), rtol=1e-6)
    for a, b in zip(g1, g8):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    assert float(m1["facets"]) == K


def test_one_facet_is_siglip():
    u, v = _data(8, 1, seed=2)
    mesh = make_mesh(2)
    ours, _ = loss_fn(u, v, jnp.float32(10.0), jnp.float32(-10.0), mesh=mesh)
    theirs, _ = jax.jit(siglip.sigmoid_loss, static_argnames=("mesh",))(u, v, jnp.float32(10.0), jnp.float32(-10.0),
                                                                      mesh=mesh)
    np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-6)
