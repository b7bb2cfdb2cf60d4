"""The objective and teacher seams: a new objective or teacher is one class plus one registry line.

Each test defines its class here (standing in for the new module) and registers it with one line, then runs it
through the config checks and the real jitted step, and checks its loss against NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_step import B, _setup

from softalign.config import checks
from softalign.config.errors import ConfigError
from softalign.objectives import registry, soft_targets
from softalign.objectives.base import LossInputs, ObjectiveContext, TeacherTargets
from softalign.objectives.teachers import Teacher
from softalign.parallel import sharding
from softalign.training.step import build_train_step, create_state, with_objective_params


class PairCosine:
    """A toy objective with a learnable leaf: mean over pairs of (1 - w * cos(u_i, v_i)), no negatives."""

    name = "pair_cosine"
    supports_soft_targets = False

    def __init__(self, context: ObjectiveContext):
        self.mesh = context.mesh

    def init_params(self):
        return {"w": jnp.ones((), jnp.float32)}

    def __call__(self, inputs: LossInputs):
        cos = jnp.sum(inputs.image_emb * inputs.text_emb, axis=-1)
        loss = jnp.mean(1.0 - inputs.params["w"] * cos)
        return loss, {"loss": loss, "w": inputs.params["w"]}


class UniformTeacher(Teacher):
    """A toy teacher that overrides one method: zero embeddings, so its soft targets are uniform over the batch
    (PSD then smooths the one-hot labels of S by alpha, i.e. label smoothing on the subset)."""

    name = "uniform"

    def targets(self, state, batch, subset_idx, embed):
        n, d = batch["image"].shape[0], 16
        return TeacherTargets(jnp.zeros((n, d)), jnp.zeros((n, d)), jnp.zeros(()), jnp.ones((n,), bool))


def _step(config, model, tx, lr, mesh, params):
    step_fn, teacher, objective = build_train_step(config, model=model, mesh=mesh, tx=tx, lr_schedule=lr)
    state = create_state(with_objective_params(jax.tree.map(jnp.array, params), objective), tx, teacher, 0)
    return jax.jit(step_fn), state


def test_a_new_objective_is_one_class_and_one_registry_line(monkeypatch):
    monkeypatch.setitem(registry.OBJECTIVES, "pair_cosine", PairCosine)  # the one registry line
    c, model, tx, lr, _, params, batches = _setup("ema", alpha_max=0.0)
    c.objective.name = "pair_cosine"
    checks.validate(c, num_data_shards=1)
    step, state = _step(c, model, tx, lr, sharding.make_mesh(1), params)
    assert float(state.params["objective"]["w"]) == 1.0
    u, v, _ = model.apply({"params": params}, batches[0]["image"], batches[0]["tokens"])
    new, metrics, _ = step(state, batches[0])
    expected = np.mean(1.0 - np.sum(np.asarray(u, np.float64) * np.asarray(v, np.float64), axis=-1))
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    new, _, _ = step(new, batches[1])  # the learning rate warms up from 0 at step 0
    assert float(new.params["objective"]["w"]) > 1.0  # the objective's own leaf is trained (up: raises cos)
    c.psd.alpha_max = 0.5  # it takes no soft targets: the checks say so in one line
    with pytest.raises(ConfigError, match="takes no PSD soft targets"):
        checks.validate(c, num_data_shards=1)


def _log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def test_a_new_teacher_is_one_class_and_one_registry_line(monkeypatch):
    monkeypatch.setitem(registry.TEACHERS, "uniform", lambda psd: UniformTeacher())  # the one registry line
    c, model, tx, lr, _, params, batches = _setup("uniform", alpha_max=0.5, fraction=0.4)
    checks.validate(c, num_data_shards=1)
    step, state = _step(c, model, tx, lr, sharding.make_mesh(1), params)
    _, metrics, _ = step(state, batches[0])
    u, v, s = (np.asarray(x, np.float64) for x in model.apply({"params": params}, batches[0]["image"],
                                                              batches[0]["tokens"]))
    key = jax.random.fold_in(jax.random.key(c.seed, impl="threefry2x32"), 0)
    _, subset = soft_targets.draw_subset(key, B, c.psd.subset_fraction, c.psd.subset_groups)
    subset = np.asarray(subset)
    total = 0.0
    for logits in (s * u @ v.T, s * v @ u.T):
        target = np.eye(B)
        target[subset] = (1 - 0.5) * np.eye(B)[subset] + 0.5 / B
        total += -(target * _log_softmax(logits)).sum(axis=1).mean() / 2
    np.testing.assert_allclose(float(metrics["loss"]), total, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["teacher_entropy"]), np.log(B), rtol=1e-5)
