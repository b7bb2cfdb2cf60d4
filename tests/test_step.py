"""The jitted train step: sharded equals single-device, no B x B buffer per device, NaN steps are skipped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_config

from softalign.models import build_model
from softalign.objectives.registry import make_teacher
from softalign.parallel import sharding
from softalign.training.optim import make_optimizer
from softalign.training.step import build_train_step, create_state, jit_train_step

B = 40  # 5 rows per device on 8 devices; no model dimension equals 40 or 5*8 by accident


def _setup(teacher="ema", alpha_max=0.5, fraction=0.4):
    c = tiny_config(**{"psd.teacher": teacher, "psd.alpha_max": alpha_max, "psd.subset_fraction": fraction,
                       "psd.ramp": "constant", "psd.temperature": 0.5, "batch_size": B})
    c.model.text.update(vocab_size=50, eot_id=2, context_length=8)
    model = build_model(c.model)
    tx, lr = make_optimizer(c.optim, c.num_steps)
    teach = make_teacher(c.psd)
    rng = np.random.default_rng(0)
    batches = [{
        "image": rng.normal(size=(B, 8, 8, 3)).astype(np.float32),
        "tokens": np.concatenate([np.ones((B, 1)), rng.integers(3, 50, (B, 5)), np.full((B, 1), 2),
                                  np.zeros((B, 1))], 1).astype(np.int32),
        "index": np.arange(B, dtype=np.int32)} for _ in range(2)]
    params = model.init(jax.random.key(0), batches[0]["image"][:1], batches[0]["tokens"][:1])["params"]
    return c, model, tx, lr, teach, params, batches


def _step_fn(c, model, tx, lr, mesh, **config_overrides):
    c = c.copy_and_resolve_references()
    c.update(config_overrides)
    return build_train_step(c, model=model, mesh=mesh, tx=tx, lr_schedule=lr)[0]


def _run(mesh, c, model, tx, lr, teach, params, batches, fsdp_min_size=2**14, **config_overrides):
    """Runs the jitted step over ``batches``; returns (state, losses, jitted step, per-step metrics)."""
    fn = _step_fn(c, model, tx, lr, mesh, **config_overrides)
    state = create_state(jax.tree.map(jnp.array, params), tx, teach, 0)  # a copy: the step donates its input
    shardings = sharding.state_sharding(mesh, state, fsdp_min_size=fsdp_min_size)
    step = jit_train_step(fn, mesh, shardings)
    state = jax.device_put(state, shardings)
    metrics = []
    for b in batches:
        state, m, host = step(state, jax.device_put(b, sharding.batch_sharding(mesh)))
        metrics.append({**m, "host": host})  # host outputs: only the memory teacher hands anything back
    return state, [float(m["loss"]) for m in metrics], step, metrics


@pytest.mark.parametrize("teacher", ["ema", "self", "snapshot"])
def test_sharded_step_equals_single_device(teacher):
    setup = _setup(teacher)
    s1, l1, _, _ = _run(sharding.make_mesh(1), *setup)
    s8, l8, _, m8 = _run(sharding.make_mesh(8), *setup)
    assert all(m["host"] == {} for m in m8)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-6)
    for a, b in zip(jax.tree.leaves(s1.teacher), jax.tree.leaves(s8.teacher)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-6)


def test_no_device_holds_batch_by_batch_logits():
    setup = _setup("ema")
    mesh = sharding.make_mesh(8)
    _, _, step, _ = _run(mesh, *setup)
    c, model, tx, lr, teach, params, batches = setup
    state = create_state(params, tx, teach, 0)
    hlo = step.lower(state, jax.device_put(batches[0], sharding.batch_sharding(mesh))).compile().as_text()
    assert f"f32[{B},{B}]" not in hlo, "a device materialises the full B x B logits"
    assert f"f32[5,{B}]" in hlo, "expected this device's 5 x B logit rows"
    assert f"f32[{B},8,8,3]" not in hlo, "the teacher's subset gather moved the whole image batch to one device"


def test_nonfinite_step_is_skipped_and_recorded():
    c, model, tx, lr, teach, params, batches = _setup("ema")
    mesh = sharding.make_mesh(1)
    fn = jax.jit(_step_fn(c, model, tx, lr, mesh))
    state = create_state(jax.tree.map(jnp.array, params), tx, teach, 0)
    state, _, _ = fn(state, batches[0])
    bad = dict(batches[1], image=np.full_like(batches[1]["image"], np.nan))
    after, m, _ = fn(state, bad)
    assert not np.isfinite(float(m["loss"]))
    assert int(after.nonfinite_step) == 1 and int(after.step) == 2
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state, state.teacher)),
                    jax.tree.leaves((after.params, after.opt_state, after.teacher))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    later, _, _ = fn(after, batches[0])
    assert int(later.nonfinite_step) == 1  # the first bad step is kept


def test_clip_baseline_runs_no_teacher_forward():
    """alpha_max=0: the step is plain InfoNCE, with loss == loss_hard and no soft term."""
    setup = _setup("ema", alpha_max=0.0)
    _, losses, _, _ = _run(sharding.make_mesh(1), *setup)
    assert all(np.isfinite(losses))


@pytest.mark.parametrize("devices", [1, 8])
def test_gradient_accumulation_equals_full_batch_step(devices):
    """Cached-feature accumulation over 5 micro-batches gives the full-batch update, PSD (EMA teacher) on."""
    setup = _setup("ema")
    mesh = sharding.make_mesh(devices)
    full, _, _, m_full = _run(mesh, *setup)
    acc, _, _, m_acc = _run(mesh, *setup, grad_accum_steps=5)
    for a, b in zip(m_full, m_acc):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(acc.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-6)


def test_bfloat16_compute_stays_finite_and_close_to_float32():
    """model.dtype='bfloat16' runs the matmuls in bf16 (params and optimizer stay f32)."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        c, model, tx, lr, teach, params, batches = _setup("ema")
        c.model.dtype = dtype
        model = build_model(c.model)
        state, losses, _, _ = _run(sharding.make_mesh(1), c, model, tx, lr, teach, params, batches * 2)
        assert all(np.isfinite(losses))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
        out[dtype] = losses
    np.testing.assert_allclose(out["bfloat16"], out["float32"], rtol=3e-2)


def test_fsdp_step_equals_replicated_and_shards_the_state():
    setup = _setup("ema")
    rep, l_rep, _, _ = _run(sharding.make_mesh(8), *setup)
    fsdp, l_fsdp, _, _ = _run(sharding.make_mesh(8, fsdp=8), *setup, fsdp_min_size=256)
    np.testing.assert_allclose(l_fsdp, l_rep, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(rep.params), jax.tree.leaves(fsdp.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-6)
    total = sum(x.nbytes for x in jax.tree.leaves(fsdp))
    per_device = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(fsdp))
    big = sum(x.nbytes for x in jax.tree.leaves(fsdp) if x.size >= 256)
    assert per_device <= (total - big) + big / 8 * 1.01  # every large leaf (params, Adam moments, EMA) split 8 ways
    assert per_device < 0.3 * total, (per_device, total)


def test_remat_gives_the_same_steps_and_scan_layers_trains():
    c, model, tx, lr, teach, params, batches = _setup("ema")
    _, plain, _, _ = _run(sharding.make_mesh(1), c, model, tx, lr, teach, params, batches)
    c.model.remat = True
    _, remat, _, _ = _run(sharding.make_mesh(1), c, build_model(c.model), tx, lr, teach, params, batches)
    np.testing.assert_allclose(remat, plain, rtol=1e-5)
    c.model.scan_layers = True
    scanned = build_model(c.model)
    p = scanned.init(jax.random.key(0), batches[0]["image"][:1], batches[0]["tokens"][:1])["params"]
    _, losses, _, _ = _run(sharding.make_mesh(1), c, scanned, tx, lr, teach, p, batches)
    assert all(np.isfinite(losses))


def test_chunked_loss_step_equals_unchunked_step():
    setup = _setup("ema")
    mesh = sharding.make_mesh(8)
    s0, l0, _, _ = _run(mesh, *setup)
    s1, l1, _, _ = _run(mesh, *setup, loss_chunk_size=2)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s0.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-6)
