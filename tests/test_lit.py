"""LiT's locked tower (optim.freeze): the locked params are bit-identical after steps, the rest train."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_config

from softalign.models import build_model
from softalign.parallel import sharding
from softalign.training.optim import make_optimizer
from softalign.training.step import build_train_step, create_state, jit_train_step


@pytest.mark.parametrize("freeze", [("text",), ("vision",)])
def test_locked_tower_stays_bit_identical(freeze):
    B = 16
    c = tiny_config(**{"batch_size": B, "psd.alpha_max": 0.0, "psd.teacher": "self", "optim.freeze": freeze,
                       "optim.weight_decay": 0.5})
    c.model.text.update(vocab_size=50, eot_id=2, context_length=8)
    mesh = sharding.make_mesh(2)
    model = build_model(c.model)
    tx, lr = make_optimizer(c.optim, c.num_steps)
    fn, teacher, _ = build_train_step(c, model=model, mesh=mesh, tx=tx, lr_schedule=lr)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.normal(size=(B, 8, 8, 3)).astype(np.float32),
                "tokens": np.concatenate([rng.integers(3, 50, (B, 6)), np.full((B, 1), 2), np.zeros((B, 1))],
                                         1).astype(np.int32),
                "index": np.arange(B, dtype=np.int32)} for _ in range(3)]
    params = model.init(jax.random.key(0), batches[0]["image"][:1], batches[0]["tokens"][:1])["params"]
    before = jax.device_get(params)
    state = create_state(jax.tree.map(jnp.array, params), tx, teacher, 0)
    shardings = sharding.state_sharding(mesh, state)
    step = jit_train_step(fn, mesh, shardings)
    state = jax.device_put(state, shardings)
    for b in batches:
        state, metrics, _ = step(state, jax.device_put(b, sharding.batch_sharding(mesh)))
    after = jax.device_get(state.params)
    locked, = freeze
    other = "vision" if locked == "text" else "text"
    jax.tree.map(np.testing.assert_array_equal, after[locked], before[locked])
    assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), after[other], before[other])))
    assert float(after["logit_scale"]) != float(before["logit_scale"])
    assert np.isfinite(float(metrics["loss"]))


def test_unknown_tower_is_refused():
    c = tiny_config(**{"optim.freeze": ("txt",)})
    with pytest.raises(ValueError, match="optim.freeze"):
        tx, _ = make_optimizer(c.optim, 4)
        tx.init({"txt": jnp.zeros(2)})


@pytest.mark.parametrize("freeze", [("text",), ("vision",)])
def test_locked_tower_with_the_projector_model(freeze):
    """optim.freeze on a precomputed-text model: the locked tower (the MLP projector, or the image tower) stays
    bit-identical through the real step with K=2 facets; the other tower and the objective's bias train."""
    from test_precomputed_text import _batches, precomputed_config, run_steps

    c = precomputed_config(**{"optim.freeze": freeze, "optim.weight_decay": 0.5})
    before, after, metrics = run_steps(c, 2, _batches())
    locked, = freeze
    other = "vision" if locked == "text" else "text"
    jax.tree.map(np.testing.assert_array_equal, after[locked], before[locked])
    assert any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), after[other], before[other])))
    assert float(after["objective"]["bias"]) != float(before["objective"]["bias"])
    assert np.isfinite(float(metrics[-1]["loss"]))
