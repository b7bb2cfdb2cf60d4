"""ProtoCLIP: back-translated prototypes, the prototype loss against float64 NumPy, the hook and its checkpointed
state, 8 devices equal 1, and a resumed run equal to an uninterrupted one."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_step import _run, _setup
from trained_run import train_tiny

from softalign.objectives import prototypes as P
from softalign.objectives.base import ObjectiveContext
from softalign.objectives.memory_bank import MemoryBank
from softalign.objectives.protoclip import ProtoCLIP, prototype_loss
from softalign.objectives.registry import make_objective
from softalign.parallel import sharding
from softalign.training.step import with_objective_params


def _unit(rng, shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_back_translate_equals_numpy_mean_per_cluster():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 6)).astype(np.float32)
    labels = rng.choice([0, 1, 3, 4], size=50).astype(np.int32)  # cluster 2 empty
    got = P.back_translate(feats, labels, 5)
    for c in range(5):
        want = feats[labels == c].mean(0) if np.any(labels == c) else np.zeros(6)
        np.testing.assert_allclose(got[c], want, rtol=1e-6, atol=1e-7)


def test_cluster_back_translates_across_modalities():
    rng = np.random.default_rng(1)
    centers = _unit(rng, (4, 8))
    which = rng.integers(0, 4, 400)
    image = (centers[which] + 0.05 * rng.normal(size=(400, 8))).astype(np.float32)
    text = (centers[(which + 1) % 4] + 0.05 * rng.normal(size=(400, 8))).astype(np.float32)
    out = P.cluster(image, text, 4, iters=10, seed=0)
    y_img, y_txt = out[P.IMAGE_LABEL], out[P.TEXT_LABEL]
    assert y_img.shape == y_txt.shape == (400,) and 0 <= y_img.min() and y_txt.max() < 4
    for c in range(4):  # C_img<-txt[c]: the normalised mean image of the records whose text is in cluster c
        want = image[y_txt == c].mean(0)
        np.testing.assert_allclose(out[P.IMAGE_FROM_TEXT][c], want / np.linalg.norm(want), rtol=1e-5, atol=1e-6)
        want = text[y_img == c].mean(0)
        np.testing.assert_allclose(out[P.TEXT_FROM_IMAGE][c], want / np.linalg.norm(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out[P.IMAGE_CENTROIDS], axis=1), 1.0, rtol=1e-6)


def _reference(u, v, scale, f, tau):
    """Float64 NumPy: mean over labelled rows of CE(s u C_stu^T, softmax(C_tea[y] C_tea^T / tau)), both ways."""
    def direction(z, stu, tea, y):
        rows = y >= 0
        logits = scale * z[rows] @ stu.T
        logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
            - logits.max(1, keepdims=True)
        t = tea[y[rows]] @ tea.T / tau
        q = np.exp(t - t.max(1, keepdims=True))
        q /= q.sum(1, keepdims=True)
        return -(q * logp).sum(1).mean(), (logits.argmax(1) == y[rows]).mean()
    i2t = direction(u, f[P.IMAGE_FROM_TEXT], f[P.TEXT_CENTROIDS], f[P.TEXT_LABEL])
    t2i = direction(v, f[P.TEXT_FROM_IMAGE], f[P.IMAGE_CENTROIDS], f[P.IMAGE_LABEL])
    return 0.5 * (i2t[0] + t2i[0]), i2t[1], t2i[1]


def _fields(rng, b, k, d):
    f = {name: _unit(rng, (k, d)) for name in P.CENTROID_FIELDS}
    f[P.IMAGE_LABEL] = rng.integers(-1, k, b).astype(np.int32)
    f[P.TEXT_LABEL] = rng.integers(-1, k, b).astype(np.int32)
    return f


def test_prototype_loss_matches_float64_reference():
    rng = np.random.default_rng(2)
    u, v = _unit(rng, (12, 5)), _unit(rng, (12, 5))
    f = _fields(rng, 12, 6, 5)
    want, acc_i2t, acc_t2i = _reference(u, v, 7.5, f, 0.05)
    with jax.enable_x64(True):
        loss, m = prototype_loss(jnp.asarray(u), jnp.asarray(v), jnp.float64(7.5),
                                 {k: jnp.asarray(x) for k, x in f.items()}, tau=0.05)
        assert loss.dtype == jnp.float64
        np.testing.assert_allclose(float(loss), want, rtol=1e-12)
        np.testing.assert_allclose(float(m["proto_i2t_acc"]), acc_i2t, rtol=1e-12)
        np.testing.assert_allclose(float(m["proto_t2i_acc"]), acc_t2i, rtol=1e-12)
        # gradient w.r.t. the scale against a central difference of the reference
        g = jax.grad(lambda s: prototype_loss(jnp.asarray(u), jnp.asarray(v), s,
                                              {k: jnp.asarray(x) for k, x in f.items()}, tau=0.05)[0])(7.5)
        eps = 1e-6
        num = (_reference(u, v, 7.5 + eps, f, 0.05)[0] - _reference(u, v, 7.5 - eps, f, 0.05)[0]) / (2 * eps)
        np.testing.assert_allclose(float(g), num, rtol=1e-6)
    f[P.IMAGE_LABEL][:] = -1
    f[P.TEXT_LABEL][:] = -1  # nothing labelled (before the first clustering): no prototype loss
    assert float(prototype_loss(jnp.asarray(u), jnp.asarray(v), 7.5, f, tau=0.05)[0]) == 0.0


def test_hook_reclusters_every_episode_and_slices_centroids():
    rng = np.random.default_rng(3)
    bank = MemoryBank(64, 8)
    hook = P.PrototypeHook(bank, k=4, episode_steps=5, iters=5, process_index=1, process_count=2)
    local = {"index": np.arange(10, 20, dtype=np.int32)}
    out = hook.before(local, 0)  # empty bank: nothing labelled, zero centroids
    assert np.all(out[P.TEXT_LABEL] == -1) and out[P.IMAGE_CENTROIDS].shape == (2, 8)
    bank.write(np.arange(40), _unit(rng, (40, 8)), _unit(rng, (40, 8)), step=0)
    assert np.all(hook.before(local, 3)[P.IMAGE_LABEL] == -1)  # not an episode boundary: no re-clustering yet
    out = hook.before(local, 5)
    ref = P.cluster(bank.image[:40], bank.text[:40], 4, 5, 0 + 2 * 5)
    np.testing.assert_array_equal(out[P.IMAGE_LABEL], ref[P.IMAGE_LABEL][10:20])
    np.testing.assert_array_equal(out[P.TEXT_LABEL], ref[P.TEXT_LABEL][10:20])
    np.testing.assert_allclose(out[P.IMAGE_FROM_TEXT], ref[P.IMAGE_FROM_TEXT][2:4])  # process 1 of 2: rows 2..3
    assert np.all(hook.before({"index": np.array([50, 3])}, 6)[P.IMAGE_LABEL] == [-1, ref[P.IMAGE_LABEL][3]])
    restored = P.PrototypeHook(bank, k=4, episode_steps=5, iters=5, process_index=1, process_count=2)
    assert restored.load({**bank.state_dict(), **hook.state_dict()}) and restored.clustered_at == 5
    bank.write(np.arange(40, 64), _unit(rng, (24, 8)), _unit(rng, (24, 8)), step=6)
    again, resumed = hook.before(local, 7), restored.before(local, 7)  # mid-episode: the step-5 prototypes
    for field in (P.IMAGE_LABEL, P.TEXT_LABEL) + P.CENTROID_FIELDS:
        np.testing.assert_array_equal(resumed[field], again[field], err_msg=field)
    old = P.PrototypeHook(bank, k=4, episode_steps=5, iters=5)
    assert not old.load(bank.state_dict())                   # a checkpoint from before prototypes were saved:
    assert old.before(local, 7)[P.IMAGE_LABEL].min() >= 0    # the first step re-clusters the restored bank
    with pytest.raises(ValueError, match="num_prototypes"):
        P.PrototypeHook(bank, k=8, episode_steps=5).load(hook.state_dict())


def _proto_setup(k=8):
    setup = list(_setup("memory", alpha_max=0.0))
    setup[0].objective.update(name="protoclip", num_prototypes=k, episode_steps=1, proto_temperature=0.05)
    bank = MemoryBank(40, 16)
    rng = np.random.default_rng(4)
    bank.write(np.arange(30), _unit(rng, (30, 16)), _unit(rng, (30, 16)), step=0)
    hook = P.PrototypeHook(bank, k=k, episode_steps=1, iters=5)
    setup[6] = [hook.before({**b, **bank.lookup(b["index"])}, i + 1) for i, b in enumerate(setup[6])]
    objective = make_objective(ObjectiveContext(setup[0], sharding.make_mesh(1), 40))
    setup[5] = with_objective_params(setup[5], objective)
    return setup


def test_protoclip_step_8_devices_equal_1():
    setup = _proto_setup()
    s1, l1, _, m1 = _run(sharding.make_mesh(1), *setup)
    s8, l8, _, m8 = _run(sharding.make_mesh(8), *setup)
    assert 0 < float(m1[0]["proto_labelled"]) < 1 and float(m1[0]["proto_loss"]) > 0
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    np.testing.assert_allclose(float(m8[1]["proto_loss"]), float(m1[1]["proto_loss"]), rtol=1e-5)
    assert float(s1.params["objective"]["proto_logit_scale"]) != np.log(1 / 0.07)  # s_p is trained
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-6)


def test_protoclip_config_checks():
    c = _setup("ema")[0]
    c.objective.name = "protoclip"
    with pytest.raises(ValueError, match="psd.teacher='memory'"):
        make_objective(ObjectiveContext(c, sharding.make_mesh(8), 40))
    c.psd.teacher = "memory"
    c.objective.num_prototypes = 12
    with pytest.raises(ValueError, match="num_prototypes"):
        make_objective(ObjectiveContext(c, sharding.make_mesh(8), 40))
    c.objective.num_prototypes = 16
    assert isinstance(make_objective(ObjectiveContext(c, sharding.make_mesh(8), 40)), ProtoCLIP)


def test_config_check_names_the_prototype_and_attentive_mask_rules():
    from tiny import tiny_config

    from softalign.config import checks

    c = tiny_config(**{"objective.name": "protoclip", "psd.teacher": "memory", "psd.alpha_max": 0.0,
                       "objective.num_prototypes": 12})
    checks.validate(c, num_data_shards=1)
    with pytest.raises(checks.ConfigError, match="num_prototypes=12 must be a multiple of the 8 data shards"):
        checks.validate(c, num_data_shards=8)
    c = tiny_config(**{"model.vision.mask_ratio": 0.5, "model.vision.mask": "attentive"})
    checks.validate(c, num_data_shards=1)                       # the default EMA teacher with soft targets
    for bad in ({"psd.teacher": "memory"}, {"psd.alpha_max": 0.0}):
        with pytest.raises(checks.ConfigError, match="mask='attentive' reads the teacher's attention"):
            checks.validate(tiny_config(**{"model.vision.mask_ratio": 0.5, "model.vision.mask": "attentive",
                                           **bad}), num_data_shards=1)


def test_resumed_protoclip_run_equals_the_uninterrupted_one(tmp_path):
    flags = ["--config.objective.name=protoclip", "--config.objective.num_prototypes=4",
             "--config.objective.episode_steps=3", "--config.psd.teacher=memory", "--config.psd.alpha_max=0",
             "--config.num_steps=6", "--config.checkpoint_every=2", "--config.data.train_size=32"]
    straight = train_tiny(str(tmp_path / "straight"), *flags)
    sliced = train_tiny(train_tiny(str(tmp_path / "sliced"), *flags, "--config.stop_at_step=4"), *flags)
    # resumed at step 4, inside the episode clustered at step 3 (2 steps an epoch: records come back)
    params = [ocp.StandardCheckpointer().restore(os.path.join(w, "checkpoints", "6", "state"))["params"]
              for w in (straight, sliced)]
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params[0]), jax.tree.leaves(params[1])):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
