"""The precomputed-text tower (model.text.kind='precomputed'): projector shapes and norms, record-major facets, the
real train step with K=2 facets and multi_positive_sigmoid (1 device = 8 devices), config refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_config

from softalign.config import checks
from softalign.config.errors import ConfigError
from softalign.models import build_model, example_inputs
from softalign.parallel import sharding
from softalign.training.optim import make_optimizer
from softalign.training.step import build_train_step, create_state, jit_train_step

K, D_IN, B = 2, 12, 16


def precomputed_config(**overrides):
    c = tiny_config(**{"model.text.kind": "precomputed", "model.text.input_dim": D_IN,
                       "model.text.projector_hidden": 24, "data.text_embedding_shape": (K, D_IN),
                       "objective.name": "multi_positive_sigmoid", "model.logit_scale_init": 10.0,
                       "psd.alpha_max": 0.0, "psd.teacher": "self", "batch_size": B,
                       "evals": {"heldout": {"kind": "embedding_retrieval", "split": "heldout"}}, **overrides})
    c.model.text.update(vocab_size=50, eot_id=2)
    return c


def test_projector_shapes_norms_and_record_major_facets():
    c = precomputed_config()
    model = build_model(c.model)
    images, text = example_inputs(c.model)
    assert text.shape == (1, D_IN) and text.dtype == jnp.float32
    params = model.init(jax.random.key(0), images, text)["params"]
    assert set(params["text"]) == {"ln_in", "hidden", "out"}
    emb = jax.random.normal(jax.random.key(1), (3, K, D_IN))
    u, v, _ = model.apply({"params": params}, jnp.zeros((3, 8, 8, 3)), emb)
    assert u.shape == (3, 16) and v.shape == (3 * K, 16)
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, rtol=1e-5)
    alone = model.apply({"params": params}, emb[1, 1][None], method=model.encode_text)
    np.testing.assert_allclose(v[1 * K + 1], alone[0], rtol=1e-5, atol=1e-6)  # row i*K+k is facet k of record i


def test_linear_projector_when_no_hidden_width():
    c = precomputed_config(**{"model.text.projector_hidden": 0})
    model = build_model(c.model)
    params = model.init(jax.random.key(0), *example_inputs(c.model))["params"]
    assert set(params["text"]) == {"ln_in", "out"} and params["text"]["out"]["kernel"].shape == (D_IN, 16)


def _batches(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": rng.normal(size=(B, 8, 8, 3)).astype(np.float32),
             "tokens": np.zeros((B, 24), np.int32),
             "text_embedding": rng.normal(size=(B, K, D_IN)).astype(np.float32),
             "index": np.arange(B, dtype=np.int32)} for _ in range(n)]


def run_steps(c, devices, batches):
    """The real jitted step over `batches` on `devices`; returns (params before, params after, metrics)."""
    mesh = sharding.make_mesh(devices)
    model = build_model(c.model)
    tx, lr = make_optimizer(c.optim, c.num_steps)
    fn, teacher, objective = build_train_step(c, model=model, mesh=mesh, tx=tx, lr_schedule=lr)
    params = model.init(jax.random.key(0), *example_inputs(c.model))["params"]
    params = {**params, "objective": objective.init_params()}
    before = jax.device_get(params)
    state = create_state(jax.tree.map(jnp.array, params), tx, teacher, 0)
    shardings = sharding.state_sharding(mesh, state)
    step = jit_train_step(fn, mesh, shardings)
    state = jax.device_put(state, shardings)
    history = []
    for b in batches:
        state, metrics, _ = step(state, jax.device_put(b, sharding.batch_sharding(mesh)))
        history.append(jax.device_get(metrics))
    return before, jax.device_get(state.params), history


def test_k2_facets_reach_mp_sigmoid_and_one_device_equals_eight():
    c = precomputed_config()
    checks.validate(c, num_data_shards=8)
    batches = _batches()
    _, p1, m1 = run_steps(c, 1, batches)
    _, p8, m8 = run_steps(c, 8, batches)
    for a, b in zip(m1, m8):
        assert float(a["facets"]) == K                               # the objective saw B*K texts for B images
        np.testing.assert_allclose(float(b["loss"]), float(a["loss"]), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6), p1, p8)
    assert m1[-1]["loss"] < m1[0]["loss"] * 1.5 and np.isfinite(m1[-1]["loss"])


def test_k2_loss_is_the_objective_on_the_models_facets():
    """The step's first loss equals multi_positive_sigmoid on the projector's record-major outputs."""
    from softalign.objectives.mp_sigmoid import multi_positive_sigmoid_loss

    c = precomputed_config()
    batches = _batches(1)
    before, _, metrics = run_steps(c, 2, batches)
    model = build_model(c.model)
    model_params = {k: v for k, v in before.items() if k != "objective"}
    u, v, s = model.apply({"params": model_params}, batches[0]["image"], batches[0]["text_embedding"])
    want, _ = multi_positive_sigmoid_loss(u, v, s, before["objective"]["bias"], mesh=sharding.make_mesh(1))
    np.testing.assert_allclose(float(metrics[0]["loss"]), float(want), rtol=1e-5)


@pytest.mark.parametrize("overrides, match", [
    ({"objective.name": "infonce"}, "multi_positive_sigmoid"),                      # K=2 with InfoNCE
    ({"data.text_embedding_shape": (K, D_IN + 1)}, "input_dim"),
    ({"evals": {"heldout": {"kind": "retrieval"}}}, "encodes caption strings"),
    ({"psd.alpha_max": 0.5, "objective.name": "infonce", "data.text_embedding_shape": (1, D_IN)}, "alpha_max=0"),
    ({"model.text.input_dim": 0}, "input_dim"),
])
def test_config_refusals(overrides, match):
    c = precomputed_config(**overrides)
    with pytest.raises(ConfigError, match=match):
        checks.validate(c, num_data_shards=1)
    assert checks.TEXT_FREE_EVALS


def test_k1_infonce_is_allowed():
    c = precomputed_config(**{"objective.name": "infonce", "data.text_embedding_shape": (1, D_IN)})
    checks.validate(c, num_data_shards=2)


def test_evaluators_that_encode_captions_are_refused_when_built():
    """softalign.evaluate builds evaluators from a run's config: the same refusal, before any data loads."""
    from softalign.evaluation import suite

    c = precomputed_config()
    with pytest.raises(ConfigError, match="encodes caption strings"):
        suite.build_evaluators(c, None, evals={"color": {"kind": "synthetic_zeroshot", "attribute": "color"}})
