"""Ground-truth objectives on the synthetic scenes against float64 NumPy references: the oracle teacher's targets,
multi-positive InfoNCE, the truth_* target-quality metrics; sharded equals single-device; clear config errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_config

from softalign.config.checks import validate
from softalign.config.errors import ConfigError
from softalign.data import scene_truth
from softalign.data.scene_truth import compatibility, encode_caption, encode_scene
from softalign.objectives import infonce, soft_targets
from softalign.objectives.base import LossInputs, TeacherTargets
from softalign.objectives.oracle import OracleTeacher, oracle_log_targets
from softalign.objectives.registry import make_teacher
from softalign.objectives.target_quality import target_quality
from softalign.parallel.sharding import make_mesh

B = 16
psd_loss = jax.jit(infonce.psd_loss, static_argnames=("tau", "mesh", "axis", "chunk_size"))


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _softmax(x):
    return np.exp(_log_softmax(x))


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _emb(seed, n=B, d=8):
    rng = np.random.default_rng(seed)
    return tuple(_unit(rng.normal(size=(n, d))).astype(np.float32) for _ in range(2))


def _truth(seed, n=B, k=3):
    """Scenes over a tiny attribute range so many pairs are true; some captions are false of their own scene
    (like swapped ones) and some images have nothing true in the batch (the first draw from `seed` that has all
    three)."""
    rng = np.random.default_rng(seed)
    while True:
        scenes, caps = [], []
        for _ in range(n):
            m = int(rng.integers(1, k + 1))
            objects = np.concatenate([rng.integers(0, 2, (m, 3)), rng.permutation(9)[:m, None]], 1)
            scenes.append(encode_scene(objects, k))
            named = objects[rng.permutation(m)[:int(rng.integers(1, m + 1))]].copy()
            named[rng.random(named.shape) < 0.5] = scene_truth.FREE
            if rng.random() < 0.4:
                named[0, 0] = 2 + int(rng.integers(3))        # a colour no scene has: false everywhere
            caps.append(encode_caption(named, k, m if rng.random() < 0.2 else -1))
        scene, caption = np.stack(scenes), np.stack(caps)
        g = compatibility(caption, scene)
        if (~g.any(1)).any() and (g.sum(1) > 1).any() and not g.diagonal().all():
            return scene, caption, g


def reference_loss(u, v, s, alpha, subset, tau, g, *, oracle=False, multi=False):
    """docs/method.md with full B x B matrices in float64; G[i, j] = caption j is true of image i."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    L = s * u @ v.T
    losses = []
    for logits, gd in ((L, g), (L.T, g.T)):
        Y = np.eye(len(u))
        if multi:
            Y = gd / np.maximum(gd.sum(1, keepdims=True), 1)
        for i in range(len(u)):
            if oracle and subset[i] and gd[i].any():
                Y[i] = (1 - alpha) * Y[i] + alpha * gd[i] / gd[i].sum()
        losses.append(-(Y * _log_softmax(logits)).sum(axis=1).mean())
    return 0.5 * sum(losses)


def _oracle_targets(scene, caption):
    return OracleTeacher().targets({}, {scene_truth.SCENE: jnp.asarray(scene),
                                        scene_truth.CAPTION: jnp.asarray(caption)}, None, None)


def test_oracle_targets_are_uniform_over_the_compatible_items():
    scene, caption, g = _truth(0)
    i2t, t2i = oracle_log_targets(jnp.asarray(scene), jnp.asarray(caption))
    for logits, gd in ((i2t, g), (t2i, g.T)):
        q = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
        has = gd.any(1)
        np.testing.assert_allclose(q[has], (gd / np.maximum(gd.sum(1, keepdims=True), 1))[has], rtol=1e-6)
    t = _oracle_targets(scene, caption)
    assert t.image_emb.shape == (B, 0) and bool(t.valid.all())


@pytest.mark.parametrize("alpha,fraction", [(0.5, 0.5), (1.0, 1.0), (0.3, 0.25)])
@pytest.mark.parametrize("devices", [1, 8])
def test_oracle_loss_matches_numpy(alpha, fraction, devices):
    u, v = _emb(1)
    scene, caption, g = _truth(2)
    _, subset = soft_targets.draw_subset(jax.random.key(4), B, fraction, 8)
    f = lambda x, y: psd_loss(x, y, 9.0, alpha=alpha, subset=subset, teacher=_oracle_targets(scene, caption),
                              tau=0.5, mesh=make_mesh(devices))
    (loss, m), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(u, v)
    ref = reference_loss(u, v, 9.0, alpha, np.asarray(subset), 0.5, g, oracle=True)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    assert all(np.isfinite(x) for x in m.values()) and all(np.isfinite(x).all() for x in grads)


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("oracle", [False, True])
def test_multi_positive_matches_numpy(devices, oracle):
    u, v = _emb(3)
    scene, caption, g = _truth(4)
    subset = np.arange(B) % 2 == 0
    teacher = _oracle_targets(scene, caption) if oracle else None
    f = functools.partial(psd_loss, alpha=0.4 if oracle else 0.0, subset=subset, teacher=teacher, tau=1.0,
                          mesh=make_mesh(devices), positives_from=(jnp.asarray(scene), jnp.asarray(caption)))
    (loss, _), grads = jax.value_and_grad(lambda x, y: f(x, y, 7.0), argnums=(0, 1), has_aux=True)(u, v)
    ref = reference_loss(u, v, 7.0, 0.4 if oracle else 0.0, subset, 1.0, g, oracle=oracle, multi=True)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    if devices == 8:   # gradients: sharded equals single-device
        _, grads1 = jax.value_and_grad(
            lambda x, y: functools.partial(f, mesh=make_mesh(1))(x, y, 7.0), argnums=(0, 1), has_aux=True)(u, v)
        for a, b in zip(grads, grads1):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_multi_positive_with_unique_captions_is_clip():
    u, v = _emb(5)
    objects = [(i % 8, i // 8, 0, 4) for i in range(B)]                 # 16 distinct objects, fully stated
    scene = np.stack([encode_scene([o], 1) for o in objects])
    caption = np.stack([encode_caption([o], 1) for o in objects])
    assert (compatibility(caption, scene) == np.eye(B, dtype=bool)).all()
    args = dict(alpha=0.0, subset=np.zeros(B, bool), teacher=None, tau=1.0, mesh=make_mesh(1))
    a, _ = psd_loss(u, v, 8.0, positives_from=(jnp.asarray(scene), jnp.asarray(caption)), **args)
    b, _ = psd_loss(u, v, 8.0, **args)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_chunked_loss_rejects_oracle_and_multi_positive():
    u, v = _emb(6)
    scene, caption, _ = _truth(7)
    with pytest.raises(ValueError, match="loss_chunk_size=0"):
        infonce.psd_loss(u, v, 5.0, alpha=0.5, subset=np.ones(B, bool), teacher=_oracle_targets(scene, caption),
                         tau=1.0, mesh=make_mesh(1), chunk_size=4)
    with pytest.raises(ValueError, match="loss_chunk_size=0"):
        infonce.InfoNCE(make_mesh(1), chunk_size=4, multi_positive=True)


# ----------------------------------------------------------------------------- target quality


def reference_quality(u, v, s, subset, tau, g, swapped, teacher_logits, rows_in_s):
    """truth_* metrics in float64; ``teacher_logits`` / ``rows_in_s``: per direction."""
    L = s * np.asarray(u, np.float64) @ np.asarray(v, np.float64).T
    eye = np.eye(B, dtype=bool)
    out = {"pair_true": g.diagonal().mean(), "false_negative_pairs": (g & ~eye).sum() / (B * (B - 1)),
           "false_negative_rows": ((g & ~eye).any(1).mean() + (g & ~eye).any(0).mean()) / 2,
           "rows_without_positive": ((~g.any(1)).mean() + (~g.any(0)).mean()) / 2,
           "student_mass_compatible": ((_softmax(L) * g).sum() + (_softmax(L.T) * g.T).sum()) / (2 * B)}
    mass, rows, self_mass, wrong_rows = 0.0, 0, 0.0, 0
    for t, gd, in_s in zip(teacher_logits, (g, g.T), rows_in_s):
        for i in np.flatnonzero(in_s):
            q = _softmax(t[i] / tau)
            mass, rows = mass + (q * gd[i]).sum(), rows + 1
            if swapped[i] and not g[i, i]:
                self_mass, wrong_rows = self_mass + q[i], wrong_rows + 1
    out["teacher_mass_compatible"] = mass / max(rows, 1)
    out["swapped_self_mass"] = self_mass / max(wrong_rows, 1)
    assert wrong_rows > 0
    return out


def _quality(u, v, s, subset, teacher, scene, caption, swapped, devices, tau=0.5):
    inputs = LossInputs(jnp.asarray(u), jnp.asarray(v), jnp.float32(s), {}, teacher, jnp.asarray(subset),
                        jnp.float32(0.5), {})
    fn = jax.jit(lambda i, t: target_quality(i, t, tau=tau, mesh=make_mesh(devices)))
    return {k.removeprefix("truth_"): float(x) for k, x in fn(inputs, (scene, caption, swapped)).items()}


@pytest.mark.parametrize("kind", ["self", "embeddings", "oracle"])
def test_target_quality_matches_numpy_and_shards(kind):
    u, v = _emb(8)
    scene, caption, g = _truth(9)
    swapped = ~g.diagonal() | (np.arange(B) % 3 == 0)
    subset = np.arange(B) % 4 != 1
    L = 11.0 * u.astype(np.float64) @ v.T.astype(np.float64)
    if kind == "self":
        teacher, t, rows = None, (L, L.T), (subset, subset)
    elif kind == "embeddings":
        tu, tv = _emb(10)
        valid = np.arange(B) % 5 != 0
        teacher = TeacherTargets(tu, tv, np.float32(6.0), valid)
        T = np.where(valid[None, :], 6.0 * tu.astype(np.float64) @ tv.T.astype(np.float64), -np.inf)
        T2 = np.where(valid[None, :], 6.0 * tv.astype(np.float64) @ tu.T.astype(np.float64), -np.inf)
        t, rows = (T, T2), (subset & valid, subset & valid)
    else:
        teacher = _oracle_targets(scene, caption)
        t = tuple(np.where(gd, 0.0, -np.inf) for gd in (g, g.T))
        rows = (subset & g.any(1), subset & g.any(0))
    want = reference_quality(u, v, 11.0, subset, 0.5, g, swapped, t, rows)
    got1 = _quality(u, v, 11.0, subset, teacher, scene, caption, swapped, 1)
    got8 = _quality(u, v, 11.0, subset, teacher, scene, caption, swapped, 8)
    assert set(got1) == set(want)
    for key in want:
        np.testing.assert_allclose(got1[key], want[key], rtol=1e-5, atol=1e-7, err_msg=key)
        np.testing.assert_allclose(got8[key], got1[key], rtol=1e-5, atol=1e-7, err_msg=key)
    if kind == "oracle":
        assert got1["teacher_mass_compatible"] == pytest.approx(1.0) and got1["swapped_self_mass"] == 0.0


def test_infonce_adds_truth_metrics_only_when_the_batch_has_them():
    u, v = _emb(11)
    scene, caption, g = _truth(12)
    batch = {scene_truth.SCENE: jnp.asarray(scene), scene_truth.CAPTION: jnp.asarray(caption),
             scene_truth.SWAPPED: jnp.asarray(~g.diagonal())}
    mk = lambda b: LossInputs(jnp.asarray(u), jnp.asarray(v), jnp.float32(5.0), {}, None, jnp.ones(B, bool),
                              jnp.float32(0.5), b)
    clip = infonce.InfoNCE(make_mesh(1), soft_targets=False)
    _, plain = jax.jit(clip)(mk({}))
    loss, m = jax.jit(clip)(mk(batch))
    assert not any(k.startswith("truth_") for k in plain)
    assert {k for k in m if k.startswith("truth_")} == {
        "truth_pair_true", "truth_false_negative_pairs", "truth_false_negative_rows",
        "truth_rows_without_positive", "truth_student_mass_compatible"}
    np.testing.assert_allclose(loss, plain["loss"], rtol=1e-6)             # the metrics do not touch the loss
    _, m = jax.jit(infonce.InfoNCE(make_mesh(1), noisy=True))(mk(batch))
    assert "truth_swapped_self_mass" in m and "truth_teacher_mass_compatible" in m
    with pytest.raises(ValueError, match="no ground truth"):
        jax.jit(infonce.InfoNCE(make_mesh(1), multi_positive=True))(mk({}))


@pytest.mark.parametrize("overrides,message", [
    ({"psd.teacher": "oracle", "data.source": "folder", "data.path": "/tmp"}, "needs the synthetic source"),
    ({"psd.teacher": "oracle", "loss_chunk_size": 4}, "loss_chunk_size=0"),
    ({"objective.multi_positive": True, "data.source": "folder", "data.path": "/tmp"}, "synthetic source"),
    ({"objective.multi_positive": True, "loss_chunk_size": 4}, "loss_chunk_size=0"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(tiny_config(**overrides), num_data_shards=8)


def test_oracle_is_registered_and_valid_on_synthetic():
    c = tiny_config(**{"psd.teacher": "oracle"})
    validate(c, num_data_shards=8)
    assert make_teacher(c.psd).name == "oracle"


def test_train_step_with_oracle_and_multi_positive_is_shard_invariant():
    from softalign.models import build_model
    from softalign.parallel import sharding
    from softalign.training.optim import make_optimizer
    from softalign.training.step import build_train_step, create_state, jit_train_step

    n = 40
    c = tiny_config(**{"psd.teacher": "oracle", "psd.ramp": "constant", "psd.subset_fraction": 0.5,
                       "objective.multi_positive": True, "data.caption_noise": 0.5, "batch_size": n})
    c.model.text.update(vocab_size=50, eot_id=2, context_length=8)
    model = build_model(c.model)
    tx, lr = make_optimizer(c.optim, c.num_steps)
    from softalign.data.synthetic import SyntheticScenes
    truth = [SyntheticScenes("train", 200, caption_noise=0.5).truth(i) for i in range(n)]
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(n, 8, 8, 3)).astype(np.float32),
             "tokens": np.concatenate([np.ones((n, 1)), rng.integers(3, 50, (n, 5)), np.full((n, 1), 2),
                                       np.zeros((n, 1))], 1).astype(np.int32),
             "index": np.arange(n, dtype=np.int32),
             **{k: np.stack([t[k] for t in truth]) for k in scene_truth.FIELDS}}
    params = model.init(jax.random.key(0), batch["image"][:1], batch["tokens"][:1])["params"]
    out = []
    for devices in (1, 8):
        mesh = sharding.make_mesh(devices)
        fn, teacher, _ = build_train_step(c, model=model, mesh=mesh, tx=tx, lr_schedule=lr)
        state = create_state(jax.tree.map(jnp.array, params), tx, teacher, 0)
        shardings = sharding.state_sharding(mesh, state)
        step = jit_train_step(fn, mesh, shardings)
        batch_on_mesh = jax.device_put(batch, sharding.batch_sharding(mesh))
        state, metrics, _ = step(jax.device_put(state, shardings), batch_on_mesh)
        out.append((state, {k: float(v) for k, v in metrics.items()}))
    (s1, m1), (s8, m8) = out
    assert m1["truth_teacher_mass_compatible"] == pytest.approx(1.0) and m1["truth_swapped_self_mass"] == 0.0
    assert 0.2 < m1["truth_pair_true"] < 0.8
    for k in m1:
        np.testing.assert_allclose(m8[k], m1[k], rtol=2e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-6)
