"""NMTune: the loss against a float64 NumPy reference (each term and the total), and the evaluator on separable
features."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softalign.evaluation import base, nmtune


def _numpy_loss(z, logits, f, y, mse_w=1.0, cov_w=0.04, svd_w=0.001):
    z, logits, f = (np.asarray(a, np.float64) for a in (z, logits, f))
    b, d = z.shape
    shifted = logits - logits.max(1, keepdims=True)
    ce = np.mean(np.log(np.exp(shifted).sum(1)) - shifted[np.arange(b), y])
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    mse = np.mean((unit(z) - unit(f)) ** 2)
    c = np.cov(z, rowvar=False)                      # (z - mean)^T (z - mean) / (b - 1)
    off = c[~np.eye(d, dtype=bool)]
    cov = np.sum(off ** 2) / d
    s = np.linalg.svd(z, compute_uv=False)
    svd = np.mean(s[:5] / s.sum())
    return ce + mse_w * mse + cov_w * cov - svd_w * svd, dict(ce=ce, mse=mse, cov=cov, svd=svd)


@pytest.mark.parametrize("weights", [dict(), dict(mse_weight=0.3, cov_weight=2.0, svd_weight=0.5)])
def test_loss_matches_numpy(weights):
    rng = np.random.default_rng(0)
    f = rng.standard_normal((12, 7)).astype(np.float32)
    z = (f + 0.3 * rng.standard_normal((12, 7)) + np.linspace(0, 2, 7)).astype(np.float32)
    logits = rng.standard_normal((12, 4)).astype(np.float32)
    y = rng.integers(0, 4, 12)
    total, parts = nmtune.nmtune_loss(jnp.asarray(z), jnp.asarray(logits), jnp.asarray(f), jnp.asarray(y), **weights)
    ref_w = [weights.get(k, d) for k, d in (("mse_weight", 1.0), ("cov_weight", 0.04), ("svd_weight", 0.001))]
    expected, ref_parts = _numpy_loss(z, logits, f, y, *ref_w)
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    for key, value in ref_parts.items():
        np.testing.assert_allclose(float(parts[key]), value, rtol=1e-5, atol=1e-8, err_msg=key)
    assert ref_parts["cov"] > 0.01 and ref_parts["svd"] > 0.05   # every term contributes


def test_loss_gradient_is_finite_and_the_head_starts_as_identity_plus_mlp():
    head = nmtune.NMTuneHead(3)
    f = jnp.asarray(np.random.default_rng(1).standard_normal((8, 5)), jnp.float32)
    params = head.init(jax.random.key(0), f)["params"]
    np.testing.assert_array_equal(params["scale"], np.ones((1, 5)))
    loss = lambda p: nmtune.nmtune_loss(*head.apply({"params": p}, f), f, jnp.arange(8) % 3)[0]
    grads = jax.grad(loss)(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_fit_separates_gaussian_classes():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 16)) * 3
    y = np.repeat(np.arange(3), 60)
    x = centres[y] + rng.standard_normal((180, 16))
    test_y = np.repeat(np.arange(3), 20)
    test_x = centres[test_y] + rng.standard_normal((60, 16))
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)   # like the L2-normalised embeddings
    predict = nmtune.fit_nmtune(unit(x), y, 3, epochs=10, batch_size=32)
    assert np.mean(predict(unit(test_x)) == test_y) > 0.9
    chance = nmtune.fit_nmtune(unit(x), rng.permutation(y), 3, epochs=10, batch_size=32)   # labels shuffled
    assert np.mean(chance(unit(test_x)) == test_y) < 0.7


def test_evaluator_is_registered_and_checks_its_options():
    assert "nmtune" in base.evaluator_kinds()
    ctx = base.EvalContext({"image_size": 8}, None, 8)
    with pytest.raises(base.ConfigError, match="evals.nm.test"):
        base.build_evaluator("nm", {"kind": "nmtune", "train": {"type": "synthetic"}}, ctx)
    with pytest.raises(base.ConfigError, match="nope"):
        base.build_evaluator("nm", {"kind": "nmtune", "nope": 1}, ctx)
