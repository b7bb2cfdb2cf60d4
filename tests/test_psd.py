"""The alpha ramp, the subset S, the teachers and the weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softalign.objectives import soft_targets
from softalign.objectives.registry import make_teacher
from softalign.objectives.teachers import EmaTeacher, SnapshotTeacher
from softalign.training.optim import weight_decay_mask


@pytest.mark.parametrize("ramp,expected", [
    ("linear", [0.0, 0.0, 0.4, 0.8, 0.8]),
    ("cosine", [0.0, 0.0, 0.4, 0.8, 0.8]),
    ("constant", [0.8, 0.8, 0.8, 0.8, 0.8]),
])
def test_alpha_schedule_start_middle_end(ramp, expected):
    fn = soft_targets.alpha_schedule(0.8, ramp, start_step=10, end_step=110)
    got = [float(fn(s)) for s in (0, 10, 60, 110, 500)]
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_cosine_ramp_is_below_linear_early():
    lin = soft_targets.alpha_schedule(1.0, "linear", 0, 100)
    cos = soft_targets.alpha_schedule(1.0, "cosine", 0, 100)
    assert float(cos(25)) < float(lin(25)) and float(cos(75)) > float(lin(75))
    np.testing.assert_allclose(float(cos(25)), (1 - np.cos(np.pi * 0.25)) / 2, atol=1e-6)


def test_bad_ramp_name():
    with pytest.raises(ValueError, match="psd.ramp"):
        soft_targets.alpha_schedule(0.5, "exponential", 0, 10)


def test_subset_size_mask_and_roundtrip():
    idx, mask = soft_targets.draw_subset(jax.random.key(1), 32, 0.3, 4)
    assert idx.shape == (4, 3) and int(mask.sum()) == 12
    glob = (np.arange(4)[:, None] * 8 + np.asarray(idx)).reshape(-1)
    assert set(np.flatnonzero(mask)) == set(glob)
    x = jnp.arange(32 * 2, dtype=jnp.float32).reshape(32, 2)
    rows = soft_targets.gather_subset(x, idx)
    np.testing.assert_array_equal(rows, np.asarray(x)[glob])
    back = soft_targets.scatter_subset(rows, idx, 32)
    np.testing.assert_array_equal(back, np.where(np.asarray(mask)[:, None], x, 0))
    # Different steps draw different subsets.
    _, mask2 = soft_targets.draw_subset(jax.random.key(2), 32, 0.3, 4)
    assert not np.array_equal(mask, mask2)


def test_subset_groups_must_divide_batch():
    with pytest.raises(ValueError, match="subset_groups"):
        soft_targets.subset_layout(30, 0.5, 8)


def test_ema_and_snapshot_teachers():
    params = {"w": jnp.ones(3)}
    ema = EmaTeacher(0.9)
    state = ema.init(params)
    state = ema.update(state, {"w": jnp.full(3, 11.0)}, 0)
    np.testing.assert_allclose(state["params"]["w"], 2.0)
    snap = SnapshotTeacher(every=5)
    s = snap.init(params)
    s = snap.prepare(s, {"w": jnp.full(3, 7.0)}, jnp.int32(3))
    np.testing.assert_allclose(s["params"]["w"], 1.0)  # mid-generation: frozen
    s = snap.prepare(s, {"w": jnp.full(3, 7.0)}, jnp.int32(10))
    np.testing.assert_allclose(s["params"]["w"], 7.0)  # a new generation starts


def test_unknown_teacher_lists_choices():
    class Cfg:
        teacher = "teleport"
    with pytest.raises(ValueError, match="ema"):
        make_teacher(Cfg())


def test_weight_decay_mask():
    params = {"logit_scale": 0.0,
              "vision": {"cls_token": jnp.zeros(4), "pos_embedding": jnp.zeros((2, 4)),
                         "ln_pre": {"scale": jnp.zeros(4), "bias": jnp.zeros(4)},
                         "blk": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)}},
              "text": {"token_embedding": {"embedding": jnp.zeros((9, 4))}, "proj": {"kernel": jnp.zeros((4, 2))}}}
    mask = weight_decay_mask(params)
    decayed = {jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(mask) if v}
    assert decayed == {"['vision']['blk']['kernel']", "['text']['proj']['kernel']"}
