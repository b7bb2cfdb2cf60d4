"""A-CLIP's recipe: crops and attention read through the same box, block-wise selection, SimCLR and BYOL against
NumPy, the wrapped loss's composition, the heads' EMA copy, and the full step sharded equal to one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_step import B, _setup

from softalign.config import checks
from softalign.models import build_model, views
from softalign.models.ssl_heads import AClipHeads, BatchStatNorm
from softalign.objectives import aclip
from softalign.objectives.base import LossInputs, ObjectiveContext
from softalign.objectives.infonce import InfoNCE
from softalign.objectives.registry import make_objective
from softalign.parallel import sharding
from softalign.training.step import (
    OBJECTIVE_PARAMS,
    build_train_step,
    create_state,
    jit_train_step,
    with_objective_params,
)


def _np_resample(x, box, size):
    """Bilinear crop-and-resize by hand, one image (H, W, C), float64."""
    h, w = x.shape[:2]
    out = np.zeros((size, size, x.shape[2]))
    top, left, bh, bw = box
    for a in range(size):
        for b in range(size):
            py = np.clip((top + (a + 0.5) / size * bh) * h - 0.5, 0, h - 1)
            px = np.clip((left + (b + 0.5) / size * bw) * w - 0.5, 0, w - 1)
            y0, x0 = int(np.floor(py)), int(np.floor(px))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            fy, fx = py - y0, px - x0
            out[a, b] = ((1 - fy) * (1 - fx) * x[y0, x0] + (1 - fy) * fx * x[y0, x1]
                         + fy * (1 - fx) * x[y1, x0] + fy * fx * x[y1, x1])
    return out


def test_resample_matches_numpy_and_the_full_box_is_the_identity():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 12, 12, 2)).astype(np.float32)
    boxes = np.array([[0.1, 0.2, 0.5, 0.7], [0.0, 0.0, 1.0, 1.0], [0.3, 0.05, 0.7, 0.6]], np.float32)
    got = np.asarray(views.resample(jnp.asarray(x), jnp.asarray(boxes), 12))
    for i in range(3):
        np.testing.assert_allclose(got[i], _np_resample(x[i].astype(np.float64), boxes[i], 12), atol=1e-5)
    np.testing.assert_allclose(got[1], x[1], atol=2e-6)  # (0, 0, 1, 1) at the same size: the input
    small = np.asarray(views.resample(jnp.asarray(x), jnp.asarray(boxes), 4))
    np.testing.assert_allclose(small[0], _np_resample(x[0].astype(np.float64), boxes[0], 4), atol=1e-5)


def test_random_boxes_lie_inside_the_image_and_follow_the_key():
    b = np.asarray(views.random_boxes(jax.random.key(0), (500, 2), (0.5, 1.0), (0.75, 4 / 3)))
    top, left, h, w = b[..., 0], b[..., 1], b[..., 2], b[..., 3]
    assert b.shape == (500, 2, 4)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 1 + 1e-6).all() and (left + w <= 1 + 1e-6).all()
    area = h * w
    assert area.min() >= 0.5 * 0.75 - 1e-6 and area.max() <= 1.0 + 1e-6  # clipping only ever shrinks a side
    assert 0.55 < np.median(area) < 0.8
    assert np.abs(b[:, 0] - b[:, 1]).max() > 0.1  # the two views differ
    again = views.random_boxes(jax.random.key(0), (500, 2), (0.5, 1.0), (0.75, 4 / 3))
    np.testing.assert_array_equal(b, np.asarray(again))


def test_block_keep_takes_whole_blocks_by_mean_attention():
    att = np.zeros((2, 4, 4), np.float32)
    att[0, 0:2, 2:4] = 1.0  # block (0, 1) of image 0
    att[0, 2:4, 0:2] = 0.5  # block (1, 0)
    att[1, 3, 3] = 9.0  # one hot patch: its block (1, 1) wins by the mean
    att[1, 0, 0], att[1, 0, 1] = 2.0, 2.0  # block (0, 0): mean 1.0 against (1, 1)'s 2.25
    keep = np.asarray(views.block_keep(jnp.asarray(att), 0.5, block=2))
    assert keep.shape == (2, 8)
    assert sorted(keep[0]) == [2, 3, 6, 7, 8, 9, 12, 13]
    assert sorted(keep[1]) == [0, 1, 4, 5, 10, 11, 14, 15]
    top = np.asarray(views.block_keep(jnp.asarray(att), 0.75, block=1))  # single patches: plain top-k
    np.testing.assert_array_equal(top, np.asarray(jax.lax.top_k(jnp.asarray(att.reshape(2, 16)), 4)[1]))
    with pytest.raises(ValueError, match="blocks"):
        views.block_keep(jnp.asarray(att), 0.5, block=3)


def test_attentive_views_read_the_attention_through_each_crop():
    """An attention map that is bright in the top-left quarter only: every patch of a view cropped to that quarter
    reads it (brightest at its top left), a view of the right half reads it only along its left edge."""
    images = jnp.zeros((1, 8, 8, 3))
    att = np.zeros((1, 4, 4), np.float32)
    att[0, :2, :2] = np.array([[4, 3], [2, 1]])
    boxes = jnp.asarray([[0.0, 0.0, 0.5, 0.5], [0.0, 0.5, 1.0, 0.5]])
    maps = np.asarray(views.resample(jnp.repeat(jnp.asarray(att), 2, 0)[..., None], boxes, 4)[..., 0])
    assert maps[0].min() > 0.5 and maps[0].argmax() == 0 and maps[0][0, 0] == 4.0
    assert maps[1][:, 1:].max() == 0.0 and maps[1][0, 0] > 0 and maps[1][3, 0] == 0.0
    np.testing.assert_array_equal(np.sort(np.asarray(views.block_keep(jnp.asarray(maps), 0.875)), 1)[1],
                                  [0, 4])  # the two it keeps: where its left edge meets the bright quarter
    crops, keep = views.attentive_views(jax.random.key(0), images, jnp.asarray(att), 2, (0.5, 1.0), (0.75, 4 / 3),
                                        0.5, 1)
    assert crops.shape == (2, 8, 8, 3) and keep.shape == (2, 8)


def _np_simclr(a, b, tau):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    n = len(a)

    def side(x, y):
        total = 0.0
        for i in range(n):
            logits = np.concatenate([x[i] @ y.T, [x[i] @ x[j] for j in range(n) if j != i]]) / tau
            total += np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[i]
        return total / n
    return 0.5 * (side(a, b) + side(b, a))


def test_simclr_and_byol_against_numpy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2, 7, 5))
    got = float(aclip.simclr_loss(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), 0.1))
    np.testing.assert_allclose(got, _np_simclr(a, b, 0.1), rtol=1e-5)
    same = float(aclip.simclr_loss(jnp.asarray(a, jnp.float32), jnp.asarray(a, jnp.float32), 0.1))
    np.testing.assert_allclose(same, _np_simclr(a, a, 0.1), rtol=1e-5)  # the released code's call
    assert same < got  # each row's positive is itself: the easy case
    p, z = rng.normal(size=(2, 6, 4))
    cos = np.sum(p * z, 1) / np.linalg.norm(p, axis=1) / np.linalg.norm(z, axis=1)
    np.testing.assert_allclose(float(aclip.byol_loss(jnp.asarray(p), jnp.asarray(z))), np.mean(2 - 2 * cos),
                               rtol=1e-5)
    grad = jax.grad(lambda t: aclip.byol_loss(jnp.asarray(p), t))(jnp.asarray(z))
    assert not np.any(np.asarray(grad))  # the target is stop-gradient


def test_heads_use_batch_statistics():
    x = jax.random.normal(jax.random.key(0), (16, 6)) * 3 + 2
    y, _ = BatchStatNorm().init_with_output(jax.random.key(1), x)
    np.testing.assert_allclose(np.asarray(y.mean(0)), 0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y.var(0)), 1, rtol=1e-3)
    heads = AClipHeads(hidden=12, dim=5)
    params = heads.init(jax.random.key(0), x)["params"]
    assert set(params) == {"simclr_head", "byol_proj", "byol_pred"}
    out = heads.apply({"params": params}, x)
    assert out["simclr"].shape == out["byol"].shape == (16, 5)
    assert set(AClipHeads(12, 5, simclr=False).init(jax.random.key(0), x)["params"]) == {"byol_proj", "byol_pred"}


def _recipe_config(**aclip_overrides):
    c = _setup("ema")[0]
    c.model.vision.update(mask="attentive", mask_ratio=0.5, patch_size=2)  # 16 patches
    c.aclip.update(dict(views=2, simclr_weight=1.0, byol_weight=2.0, head_hidden=16, head_dim=8), **aclip_overrides)
    return c


def test_wrapped_loss_is_the_views_mean_plus_the_weighted_terms():
    c = _recipe_config()
    mesh = sharding.make_mesh(1)
    wrapped = make_objective(ObjectiveContext(c, mesh, B))
    assert isinstance(wrapped, aclip.AClip) and wrapped.supports_soft_targets
    inner = InfoNCE.from_context(ObjectiveContext(c, mesh, B))
    rng = np.random.default_rng(2)
    unit = lambda x: jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), jnp.float32)  # noqa: E731
    img, txt = unit(rng.normal(size=(2 * B, 16))), unit(rng.normal(size=(B, 16)))
    pooled, target = jnp.asarray(rng.normal(size=(2 * B, 32)), jnp.float32), jnp.asarray(rng.normal(size=(B, 8)))
    params = wrapped.init_params()
    base = LossInputs(img, txt, jnp.float32(10.0), params, None, jnp.zeros((B,), bool), jnp.float32(0.0), {},
                      {"pooled": pooled, "byol_target": target})
    loss, metrics = wrapped(base)
    plain = base._replace(params={}, features=None)
    views_ = [float(inner(plain._replace(image_emb=img.reshape(B, 2, 16)[:, v]))[0]) for v in range(2)]
    out = wrapped.heads.apply({"params": params[aclip.HEADS]}, pooled)
    q = np.asarray(out["simclr"]).reshape(B, 2, -1)
    simclr = _np_simclr(q[:, 0].astype(np.float64), q[:, 1].astype(np.float64), 0.1)
    byol = float(aclip.byol_loss(out["byol"], jnp.repeat(target, 2, axis=0)))
    np.testing.assert_allclose(float(loss), 0.5 * sum(views_) + simclr + 2 * byol, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["aclip_simclr"]), simclr, rtol=1e-5)
    assert float(metrics["loss"]) == float(loss)


def test_recipe_config_errors():
    c = _recipe_config(views=1)
    with pytest.raises(ValueError, match="simclr_pairs='views' contrasts two views"):
        make_objective(ObjectiveContext(c, None, B))
    c.aclip.simclr_pairs = "reference"
    assert isinstance(make_objective(ObjectiveContext(c, None, B)), aclip.AClip)
    c = _recipe_config()
    c.model.vision.mask = "random"
    with pytest.raises(checks.ConfigError, match="A-CLIP's recipe"):
        checks.validate(c, num_data_shards=1)
    c = _recipe_config(views=3)
    with pytest.raises(checks.ConfigError, match="aclip.views=3"):
        checks.validate(c, num_data_shards=1)
    c = _setup("ema")[0]  # the defaults: nothing wrapped, today's objective
    c.model.vision.update(mask="attentive", mask_ratio=0.5)
    assert isinstance(make_objective(ObjectiveContext(c, None, B)), InfoNCE)


def _run_recipe(devices, c, steps=2):
    model = build_model(c.model)
    _, _, tx, lr, teacher, _, batches = _setup("ema")
    mesh = sharding.make_mesh(devices)
    fn, teacher, objective = build_train_step(c, model=model, mesh=mesh, tx=tx, lr_schedule=lr)
    params = model.init(jax.random.key(0), batches[0]["image"][:1], batches[0]["tokens"][:1])["params"]
    state = create_state(with_objective_params(params, objective), tx, teacher, 0)
    shardings = sharding.state_sharding(mesh, state)
    step = jit_train_step(fn, mesh, shardings)
    start = jax.device_get(state)
    state = jax.device_put(state, shardings)
    metrics = []
    for b in (batches * steps)[:steps]:
        state, m, _ = step(state, jax.device_put(b, sharding.batch_sharding(mesh)))
        metrics.append(jax.device_get(m))
    return start, jax.device_get(state), metrics


def test_recipe_step_trains_the_heads_keeps_their_ema_and_8_devices_equal_1():
    c = _recipe_config()
    start, s1, m1 = _run_recipe(1, c)
    _, s8, m8 = _run_recipe(8, c)
    for key in ("loss", "aclip_simclr", "aclip_byol", "aclip_contrast_view1", "aclip_contrast_view2"):
        np.testing.assert_allclose([m[key] for m in m8], [m[key] for m in m1], rtol=1e-5)
        assert np.isfinite(m1[-1][key])
    flat1, flat8 = jax.tree_util.tree_leaves_with_path(s1.params), jax.tree.leaves(s8.params)
    for (path, a), b in zip(flat1, flat8):
        name = jax.tree_util.keystr(path)
        if "simclr_head" in name and "bias" in name and "dense2" not in name:
            continue  # a bias just before a batch norm: its gradient is 0 up to rounding, which Adam scales up
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-6, err_msg=name)
    heads0, heads = start.params[OBJECTIVE_PARAMS][aclip.HEADS], s1.params[OBJECTIVE_PARAMS][aclip.HEADS]
    for name in ("simclr_head", "byol_proj", "byol_pred"):  # every head gets a gradient
        assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(heads0[name]),
                                                             jax.tree.leaves(heads[name])))
    m = c.psd.ema_momentum  # the teacher holds the heads' moving average: BYOL's EMA projector
    ema = s1.teacher["params"][OBJECTIVE_PARAMS][aclip.HEADS]["byol_proj"]
    assert not np.allclose(jax.tree.leaves(ema)[0], jax.tree.leaves(heads["byol_proj"])[0])
    assert m > 0 and jax.tree.structure(ema) == jax.tree.structure(heads["byol_proj"])
    assert m1[0]["aclip_contrast_view1"] != m1[0]["aclip_contrast_view2"]  # two different crops


def test_recipe_terms_switch_off_one_at_a_time():
    for overrides, present, absent in (({"simclr_weight": 0.0}, "aclip_byol", "aclip_simclr"),
                                       ({"byol_weight": 0.0}, "aclip_simclr", "aclip_byol")):
        c = _recipe_config(**overrides)
        _, state, metrics = _run_recipe(1, c, steps=1)
        assert present in metrics[0] and absent not in metrics[0]
    c = _recipe_config(simclr_weight=0.0, byol_weight=0.0)  # views alone: no heads at all
    _, state, metrics = _run_recipe(1, c, steps=1)
    assert OBJECTIVE_PARAMS not in state.params and "aclip_contrast_view2" in metrics[0]
