"""The PSD loss against a plain NumPy reference, its identities, gradients, and sharding invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softalign.objectives import infonce, soft_targets
from softalign.objectives.base import TeacherTargets
from softalign.parallel.sharding import make_mesh

# Jitted once per (tau, mesh): eager shard_map (and its transpose) would run op by op and take minutes.
psd_loss = jax.jit(infonce.psd_loss, static_argnames=("tau", "mesh", "axis", "chunk_size"))


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def reference_loss(u, v, s, alpha, subset, tau, teacher=None):
    """METHOD.md written out with full B x B matrices in float64."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    B = u.shape[0]
    L = s * u @ v.T
    if teacher is None:
        T, valid = L.copy(), np.ones(B, bool)
    else:
        ti, tt, ts = (np.asarray(x, np.float64) for x in teacher[:3])
        valid = np.asarray(teacher[3])
        T = ts * ti @ tt.T
        T = np.where(valid[None, :] & valid[:, None], T, -np.inf)
    losses = []
    for logits, tlog in ((L, T), (L.T, T.T)):
        Y = np.eye(B)
        for i in range(B):
            if subset[i] and valid[i]:
                Y[i] = (1 - alpha) * Y[i] + alpha * _softmax(tlog[i] / tau)
        losses.append(-(Y * _log_softmax(logits)).sum(axis=1).mean())
    return 0.5 * sum(losses)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _inputs(B=16, D=8, seed=0):
    rng = np.random.default_rng(seed)
    return _unit(rng.normal(size=(B, D))).astype(np.float32), _unit(rng.normal(size=(B, D))).astype(np.float32)


@pytest.fixture(scope="module")
def mesh1():
    return make_mesh(1)


def _clip_infonce(u, v, s):
    L = s * np.asarray(u, np.float64) @ np.asarray(v, np.float64).T
    idx = np.arange(len(u))
    return 0.5 * (-_log_softmax(L)[idx, idx].mean() - _log_softmax(L.T)[idx, idx].mean())


def test_alpha_zero_is_clip_infonce(mesh1):
    u, v = _inputs()
    subset = np.ones(16, bool)
    loss, m = psd_loss(u, v, 14.3, alpha=0.0, subset=subset, teacher=None, tau=0.5, mesh=mesh1)
    np.testing.assert_allclose(loss, _clip_infonce(u, v, 14.3), rtol=1e-5)
    np.testing.assert_allclose(m["loss_hard"], loss, rtol=1e-6)


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25])
def test_self_teacher_matches_numpy(mesh1, tau, fraction):
    u, v = _inputs(seed=1)
    _, subset = soft_targets.draw_subset(jax.random.key(3), 16, fraction, 4)
    loss, _ = psd_loss(u, v, 10.0, alpha=0.6, subset=subset, teacher=None, tau=tau, mesh=mesh1)
    np.testing.assert_allclose(loss, reference_loss(u, v, 10.0, 0.6, np.asarray(subset), tau), rtol=1e-5)


def test_external_teacher_matches_numpy_both_directions(mesh1):
    u, v = _inputs(seed=2)
    tu, tv = _inputs(seed=3)
    valid = np.zeros(16, bool)
    valid[[0, 3, 4, 9, 10, 15]] = True
    subset = np.zeros(16, bool)
    subset[[0, 1, 3, 9, 12, 15]] = True  # 1 and 12 are in S but have no teacher: they keep one-hot targets
    teacher = TeacherTargets(tu, tv, np.float32(20.0), valid)
    loss, m = psd_loss(u, v, 10.0, alpha=0.7, subset=subset, teacher=teacher, tau=0.8, mesh=mesh1)
    ref = reference_loss(u, v, 10.0, 0.7, subset, 0.8, teacher=(tu, tv, 20.0, valid))
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    # Swapping the towers swaps the directions; the loss is symmetric in that sense.
    swapped = TeacherTargets(tv, tu, np.float32(20.0), valid)
    loss2, _ = psd_loss(v, u, 10.0, alpha=0.7, subset=subset, teacher=swapped, tau=0.8, mesh=mesh1)
    np.testing.assert_allclose(loss2, loss, rtol=1e-5)
    assert np.isfinite(m["teacher_entropy"]) and m["teacher_entropy"] > 0


def test_self_teacher_at_tau_one_has_no_soft_gradient(mesh1):
    """METHOD.md: at tau=1 the mixed target only scales row i's gradient by (1 - alpha)."""
    u, v = _inputs(seed=4)
    alpha = 0.4
    full = np.ones(16, bool)

    def grad(alpha_, u_):
        f = lambda x: psd_loss(x, v, 10.0, alpha=alpha_, subset=full, teacher=None, tau=1.0, mesh=mesh1)[0]
        return jax.grad(f)(u_)

    np.testing.assert_allclose(grad(alpha, u), (1 - alpha) * grad(0.0, u), rtol=1e-4, atol=1e-7)
    # ... whereas a sharpening temperature changes the direction of the gradient.
    g_sharp = jax.grad(lambda x: psd_loss(x, v, 10.0, alpha=alpha, subset=full, teacher=None, tau=0.5,
                                          mesh=mesh1)[0])(u)
    assert not np.allclose(g_sharp, (1 - alpha) * grad(0.0, u), rtol=1e-3)


def test_gradients_match_finite_differences(mesh1):
    u, v = _inputs(B=6, D=4, seed=5)
    tu, tv = _inputs(B=6, D=4, seed=6)
    subset = np.array([1, 0, 1, 1, 0, 1], bool)
    teacher = TeacherTargets(tu, tv, np.float32(5.0), np.ones(6, bool))

    @jax.jit
    def f(x, y, s):
        return psd_loss(x, y, s, alpha=0.5, subset=subset, teacher=teacher, tau=0.7, mesh=mesh1)[0]

    with jax.enable_x64(True):
        args = (jnp.asarray(u, jnp.float64), jnp.asarray(v, jnp.float64), jnp.asarray(7.0, jnp.float64))
        grads = jax.grad(f, argnums=(0, 1, 2))(*args)
        eps = 1e-6
        for a, g in enumerate(grads):
            g = np.asarray(g)
            assert np.all(np.isfinite(g))
            flat = np.asarray(args[a]).reshape(-1)
            for k in range(0, flat.size, max(flat.size // 5, 1)):
                plus, minus = flat.copy(), flat.copy()
                plus[k] += eps
                minus[k] -= eps
                shape = np.shape(args[a])
                ap = list(args)
                am = list(args)
                ap[a] = jnp.asarray(plus.reshape(shape))
                am[a] = jnp.asarray(minus.reshape(shape))
                fd = (f(*ap) - f(*am)) / (2 * eps)
                np.testing.assert_allclose(g.reshape(-1)[k], fd, rtol=1e-5, atol=1e-8)


def test_sharded_loss_equals_single_device():
    u, v = _inputs(B=32, seed=7)
    tu, tv = _inputs(B=32, seed=8)
    _, subset = soft_targets.draw_subset(jax.random.key(0), 32, 0.5, 8)
    teacher = TeacherTargets(tu, tv, np.float32(12.0), np.asarray(subset))

    def run(mesh):
        f = lambda x, y: psd_loss(x, y, 9.0, alpha=0.5, subset=subset, teacher=teacher, tau=0.5, mesh=mesh)
        (loss, m), g = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(u, v)
        return loss, m, g

    l1, m1, g1 = run(make_mesh(1))
    l8, m8, g8 = run(make_mesh(8))
    np.testing.assert_allclose(l8, l1, rtol=1e-6)
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, err_msg=k)
    for a, b in zip(g1, g8):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_in_batch_accuracy_and_entropy_are_sane(mesh1):
    u, _ = _inputs(seed=9)
    loss, m = psd_loss(u, u, 50.0, alpha=0.5, subset=np.ones(16, bool), teacher=None, tau=1.0, mesh=mesh1)
    assert m["i2t_acc"] == 1.0 and m["t2i_acc"] == 1.0
    assert 0.0 <= m["teacher_entropy"] <= np.log(16)


@pytest.mark.parametrize("devices,chunk", [(1, 5), (1, 64), (2, 4), (2, 5), (8, 2), (8, 3)])
@pytest.mark.parametrize("mode", ["clip", "self", "teacher"])
def test_chunked_loss_equals_unchunked_in_value_and_gradients(devices, chunk, mode):
    """The ring of key blocks, tiled in chunks with an online log-sum-exp (custom_vjp), must not change the loss
    or its gradients; chunk sizes that do not divide the per-device block are padded and masked."""
    mesh = make_mesh(devices)
    B = 16
    u, v = _inputs(B=B, seed=11)
    tu, tv = _inputs(B=B, seed=12)
    _, subset = soft_targets.draw_subset(jax.random.key(5), B, 0.5, 2)
    teacher = TeacherTargets(tu, tv, np.float32(15.0), np.asarray(subset)) if mode == "teacher" else None
    alpha = 0.0 if mode == "clip" else 0.6

    def run(c):
        f = lambda x, y, s: psd_loss(x, y, s, alpha=alpha, subset=subset, teacher=teacher, tau=0.7, mesh=mesh,
                                     chunk_size=c)
        (loss, m), g = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(u, v, jnp.float32(11.0))
        return loss, m, g

    l0, m0, g0 = run(0)
    lc, mc, gc = run(chunk)
    np.testing.assert_allclose(lc, l0, rtol=1e-5)
    for k in m0:
        np.testing.assert_allclose(mc[k], m0[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(g0, gc):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
