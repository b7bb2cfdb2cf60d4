"""TinyCLIP distillation: the affinity-mimicking loss vs float64 NumPy, chunked = unchunked, weight inheritance,
and a frozen external teacher in the train step (bit-identical after steps, outside the optimizer)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from tiny import tiny_config
from trained_run import run_module, train_tiny

from softalign.models import build_model
from softalign.models.inherit import inherit, layer_map
from softalign.objectives.base import LossInputs, TeacherTargets
from softalign.objectives.distill import Distill, ExternalTeacher
from softalign.parallel import sharding
from softalign.parallel.sharding import make_mesh
from softalign.training.optim import make_optimizer
from softalign.training.step import create_state, jit_train_step, make_train_step


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _emb(B, D, seed):
    rng = np.random.default_rng(seed)
    return [_unit(rng.normal(size=(B, D))).astype(np.float32) for _ in range(2)]


def _ce(logits, target_logits):
    """Row mean of CE(logits, softmax(target_logits)) in float64."""
    lp = logits - logits.max(1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))
    q = np.exp(target_logits - target_logits.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    return -(q * lp).sum(1).mean()


def reference(u, v, s, tu, tv, ts, alpha, tau):
    """TinyCLIP's loss: alpha * 1/2 [CE(sUV^T, softmax(tU_tV_t^T)) + CE(sVU^T, ...)] + (1 - alpha) * InfoNCE."""
    u, v, tu, tv = (np.asarray(x, np.float64) for x in (u, v, tu, tv))
    L, T = s * u @ v.T, ts * tu @ tv.T / tau
    eye = np.eye(len(u)) * 1e9  # softmax of this is one-hot: the hard targets
    soft = 0.5 * (_ce(L, T) + _ce(L.T, T.T))
    hard = 0.5 * (_ce(L, eye) + _ce(L.T, eye))
    return alpha * soft + (1 - alpha) * hard


def _loss_fn(mesh, alpha, tau, chunk):
    objective = Distill(mesh, alpha=alpha, tau=tau, chunk_size=chunk)

    @jax.jit
    def f(u, v, s, tu, tv):
        B = u.shape[0]
        t = TeacherTargets(tu, tv, jnp.float32(20.0), jnp.ones((B,), bool))
        inputs = LossInputs(u, v, s, {}, t, jnp.zeros((B,), bool), jnp.float32(0.0), {})
        return objective(inputs)
    return f


@pytest.mark.parametrize("alpha,tau", [(1.0, 1.0), (0.3, 1.0), (1.0, 0.5)])
def test_distill_loss_matches_numpy(alpha, tau):
    """Whatever subset and alpha the step hands in, distill uses every row and its own alpha."""
    u, v = _emb(12, 6, 0)
    tu, tv = _emb(12, 6, 1)
    loss, metrics = _loss_fn(make_mesh(1), alpha, tau, 0)(u, v, jnp.float32(9.0), tu, tv)
    np.testing.assert_allclose(float(loss), reference(u, v, 9.0, tu, tv, 20.0, alpha, tau), rtol=1e-5)
    assert float(metrics["alpha"]) == pytest.approx(alpha)


def test_pure_mimicking_of_itself_is_minimal():
    """alpha=1 and a teacher identical to the student: the gradient w.r.t. the student's logits is zero."""
    u, v = _emb(8, 4, 3)
    f = _loss_fn(make_mesh(1), 1.0, 1.0, 0)
    g = jax.grad(lambda a, b: f(a, b, jnp.float32(20.0), jnp.asarray(u), jnp.asarray(v))[0], argnums=(0, 1))(u, v)
    assert max(float(jnp.abs(x).max()) for x in g) < 1e-5


@pytest.mark.parametrize("devices,chunk", [(1, 5), (2, 4), (8, 3)])
def test_chunked_equals_unchunked(devices, chunk):
    mesh = make_mesh(devices)
    u, v = _emb(16, 8, 4)
    tu, tv = _emb(16, 8, 5)
    s = jnp.float32(11.0)

    def run(c):
        f = _loss_fn(mesh, 0.7, 1.0, c)
        (loss, _), g = jax.value_and_grad(lambda a, b, sc: f(a, b, sc, tu, tv), argnums=(0, 1, 2),
                                          has_aux=True)(u, v, s)
        return loss, g

    l0, g0 = run(0)
    lc, gc = run(chunk)
    np.testing.assert_allclose(float(lc), float(l0), rtol=1e-5)
    np.testing.assert_allclose(float(l0), reference(u, v, 11.0, tu, tv, 20.0, 0.7, 1.0), rtol=1e-5)
    for a, b in zip(g0, gc):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def _model_config(width, depth, heads, embed, scan=False):
    c = tiny_config()
    m = c.model
    m.embed_dim = embed
    m.scan_layers = scan
    m.vision.update(width=width, depth=depth, num_heads=heads)
    m.text.update(width=width, depth=depth, num_heads=heads, vocab_size=50, eot_id=2, context_length=8)
    return m


def _init(cfg, seed=0):
    model = build_model(cfg)
    images = jnp.zeros((1, cfg.vision.image_size, cfg.vision.image_size, 3))
    tokens = jnp.zeros((1, cfg.text.context_length), jnp.int32)
    return jax.device_get(model.init(jax.random.key(seed), images, tokens)["params"])


def test_inherited_params_are_the_teachers_slices():
    t_cfg, s_cfg = _model_config(32, 4, 2, 16), _model_config(16, 2, 1, 8)  # head width 16 on both
    teacher = _init(t_cfg)
    student = inherit(teacher, t_cfg, s_cfg)
    assert layer_map(4, 2) == [0, 2] and layer_map(12, 9) == list(range(9)) and layer_map(12, 3) == [0, 4, 8]
    for tower in ("vision", "text"):
        for i, j in enumerate(layer_map(4, 2)):
            s_blk = student[tower]["transformer"][f"resblocks_{i}"]
            t_blk = teacher[tower]["transformer"][f"resblocks_{j}"]
            qkv = np.asarray(t_blk["attn"]["in_proj"]["kernel"]).reshape(32, 3, 2, 16)[:16, :, :1, :]
            np.testing.assert_array_equal(s_blk["attn"]["in_proj"]["kernel"], qkv.reshape(16, 48))
            bias = np.asarray(t_blk["attn"]["in_proj"]["bias"]).reshape(3, 2, 16)[:, :1, :]
            np.testing.assert_array_equal(s_blk["attn"]["in_proj"]["bias"], bias.reshape(48))
            np.testing.assert_array_equal(s_blk["attn"]["out_proj"]["kernel"],
                                          t_blk["attn"]["out_proj"]["kernel"][:16, :16])
            np.testing.assert_array_equal(s_blk["mlp"]["c_fc"]["kernel"], t_blk["mlp"]["c_fc"]["kernel"][:16, :64])
            np.testing.assert_array_equal(s_blk["mlp"]["c_proj"]["bias"], t_blk["mlp"]["c_proj"]["bias"][:16])
            np.testing.assert_array_equal(s_blk["ln_2"]["scale"], t_blk["ln_2"]["scale"][:16])
        np.testing.assert_array_equal(student[tower]["proj"]["kernel"], teacher[tower]["proj"]["kernel"][:16, :8])
    np.testing.assert_array_equal(student["text"]["token_embedding"]["embedding"],
                                  teacher["text"]["token_embedding"]["embedding"][:, :16])
    np.testing.assert_array_equal(student["vision"]["patch_embed"]["kernel"],
                                  teacher["vision"]["patch_embed"]["kernel"][..., :16])
    assert float(student["logit_scale"]) == float(teacher["logit_scale"])
    shapes = jax.tree.map(np.shape, _init(s_cfg))
    assert jax.tree.map(np.shape, student) == shapes  # a complete student tree, nothing extra


def test_inheriting_the_same_size_is_the_identity_and_scan_layouts_agree():
    cfg = _model_config(32, 2, 2, 16)
    teacher = _init(cfg, seed=3)
    same = inherit(teacher, cfg, cfg)
    jax.tree.map(np.testing.assert_array_equal, same, teacher)
    s_cfg, s_scan = _model_config(16, 1, 1, 8), _model_config(16, 1, 1, 8, scan=True)
    flat = traverse_util.flatten_dict(inherit(teacher, cfg, s_cfg), sep="/")
    scanned = traverse_util.flatten_dict(inherit(teacher, cfg, s_scan), sep="/")
    for path, leaf in scanned.items():
        if "/resblocks/block/" in path:
            np.testing.assert_array_equal(leaf[0], flat[path.replace("/resblocks/block/", "/resblocks_0/")])
        else:
            np.testing.assert_array_equal(leaf, flat[path])


def test_inheritance_refuses_another_head_width_or_a_deeper_student():
    t_cfg = _model_config(32, 2, 2, 16)
    teacher = _init(t_cfg)
    with pytest.raises(ValueError, match="head width"):
        inherit(teacher, t_cfg, _model_config(16, 2, 2, 8))
    with pytest.raises(ValueError, match="depth"):
        inherit(teacher, t_cfg, _model_config(32, 3, 2, 16))


def test_external_teacher_is_frozen_and_outside_the_optimizer():
    """Three steps on 8 devices: the student moves, the teacher's params stay bit-identical, the optimizer state
    holds the student's leaves only, and the teacher's affinities reach the loss (alpha=1: no hard term)."""
    B = 16
    c = tiny_config(**{"batch_size": B, "psd.alpha_max": 0.0, "psd.teacher": "self"})
    s_cfg, t_cfg = _model_config(16, 1, 1, 8), _model_config(32, 2, 2, 16)
    s_cfg.vision.update(image_size=8, patch_size=4)
    t_cfg.vision.update(image_size=8, patch_size=4)
    mesh = make_mesh(8)
    model = build_model(s_cfg)
    tx, lr = make_optimizer(c.optim, c.num_steps)
    objective = Distill(mesh, alpha=1.0)
    teacher_params = _init(t_cfg, seed=7)
    teacher = objective.teacher.attach(t_cfg, teacher_params)
    assert isinstance(teacher, ExternalTeacher)
    fn = make_train_step(model=model, tx=tx, lr_schedule=lr, teacher=teacher, objective=objective,
                         psd_config=c.psd, num_steps=c.num_steps, mesh=mesh, batch_size=B)
    state = create_state(jax.tree.map(jnp.asarray, inherit(teacher_params, t_cfg, s_cfg)), tx, teacher, 0)
    shardings = sharding.state_sharding(mesh, state)
    step = jit_train_step(fn, mesh, shardings)
    state = jax.device_put(state, shardings)
    before = jax.device_get(state.params)
    rng = np.random.default_rng(0)
    for _ in range(3):
        batch = {"image": rng.normal(size=(B, 8, 8, 3)).astype(np.float32),
                 "tokens": np.concatenate([rng.integers(3, 50, (B, 6)), np.full((B, 1), 2), np.zeros((B, 1))],
                                          1).astype(np.int32),
                 "index": np.arange(B, dtype=np.int32)}
        state, metrics, _ = step(state, jax.device_put(batch, sharding.batch_sharding(mesh)))
    after = jax.device_get(state.teacher["params"])
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), after, teacher_params)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                                         jax.device_get(state.params), before))
    assert any(moved)
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(s)]
    assert len(adam) == 1  # adam's moments mirror the student's params, nothing of the teacher's
    assert jax.tree.structure(adam[0].mu) == jax.tree.structure(state.params)
    assert float(metrics["teacher_scale"]) == pytest.approx(float(np.exp(teacher_params["logit_scale"])))
    assert float(metrics["loss"]) == pytest.approx(float(metrics["loss_soft"]), rel=1e-5)


def test_distill_run_from_a_teacher_workdir(tmp_path):
    """End to end through ``python -m softalign.main``: a tiny teacher run, then a half-width student that
    inherits from it, borrows its tokenizer and distills from it; a distill run without a teacher is refused."""
    teacher = train_tiny(str(tmp_path / "teacher"))
    student = str(tmp_path / "student")
    args = (f"--workdir={student}", "--config.objective.name=distill", f"--config.distill.teacher={teacher}",
            "--config.distill.inherit=True", "--config.distill.alpha=0.5", "--config.psd.alpha_max=0",
            "--config.psd.teacher=self", "--config.model.embed_dim=8", "--config.model.vision.width=16",
            "--config.model.vision.num_heads=1", "--config.model.text.width=16", "--config.model.text.num_heads=1",
            "--config.num_steps=2", "--config.checkpoint_every=2")
    r = run_module("softalign.main", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Weight inheritance:" in r.stdout
    assert os.path.exists(os.path.join(student, "done.json"))
    with open(os.path.join(student, "tokenizer.json"), "rb") as a, open(os.path.join(teacher, "tokenizer.json"),
                                                                         "rb") as b:
        assert a.read() == b.read()
    bad = run_module("softalign.main", f"--workdir={tmp_path / 'bad'}", "--config.objective.name=distill",
                     "--config.psd.teacher=self", "--config.psd.alpha_max=0")
    assert bad.returncode != 0 and "distill.teacher" in bad.stderr


def test_the_teachers_weights_are_an_argument_of_the_state_init_not_constants():
    c = tiny_config()
    s_cfg, t_cfg = _model_config(16, 1, 1, 8), _model_config(32, 2, 2, 16)
    teacher_params = _init(t_cfg, seed=7)
    teacher = Distill(make_mesh(1), alpha=1.0).teacher.attach(t_cfg, teacher_params)
    tx, _ = make_optimizer(c.optim, c.num_steps)
    student = jax.tree.map(jnp.asarray, inherit(teacher_params, t_cfg, s_cfg))
    const_size = lambda jaxpr: sum(int(np.size(x)) for x in jaxpr.consts)
    teacher_size = sum(int(np.size(x)) for x in jax.tree.leaves(teacher_params))
    baked = jax.make_jaxpr(lambda p: create_state(p, tx, teacher, 0))(student)
    passed = jax.make_jaxpr(lambda p, t: create_state(p, tx, teacher, 0, t))(student, teacher.init_inputs())
    assert const_size(baked) > 0.99 * teacher_size > 1000 and const_size(passed) < 100   # scalars may inline
    state = jax.jit(lambda p, t: create_state(p, tx, teacher, 0, t))(student, teacher.init_inputs())
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.teacher["params"],
                 teacher_params)
