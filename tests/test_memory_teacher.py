"""The memory teacher: host bank semantics, the step's targets against NumPy, first-epoch CLIP equality, the
one-step write-back lag, exact resume, and 8 devices (also chunked / accumulated) against 1."""

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_step import B, _run, _setup
from tiny import tiny_config

from softalign import workdir as run_files
from softalign.config import checks
from softalign.objectives import memory_bank, soft_targets
from softalign.objectives.memory_bank import MEMORY_IMAGE, MEMORY_SEEN, MEMORY_TEXT, MemoryBank
from softalign.parallel import sharding
from softalign.training import checkpointing, train


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_bank_lookup_write_stage_and_state_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    bank = MemoryBank(10, 4, "float16")
    assert bank.nbytes == memory_bank.bank_nbytes(10, 4, "float16") == 10 * (2 * 4 * 2 + 4)
    rows = bank.lookup([3, 7])
    assert not rows[MEMORY_SEEN].any() and rows[MEMORY_IMAGE].dtype == np.float16
    assert rows[MEMORY_IMAGE].shape == rows[MEMORY_TEXT].shape == (2, 4)
    img, txt = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
    bank.write([3, 7, 3], img, txt, step=5)  # record 3 twice (an epoch boundary inside a batch): the last row wins
    rows = bank.lookup([7, 3, 0])
    np.testing.assert_array_equal(rows[MEMORY_SEEN], [True, True, False])
    np.testing.assert_array_equal(rows[MEMORY_IMAGE], np.stack([img[1], img[2], 0 * img[0]]).astype(np.float16))
    np.testing.assert_array_equal(rows[MEMORY_TEXT][:2], txt[[1, 2]].astype(np.float16))
    np.testing.assert_array_equal(bank.last_step[[3, 7, 0]], [5, 5, -1])
    with pytest.raises(ValueError, match=r"out of range \[0, 10\)"):
        bank.lookup([10])
    # stage(): step t's output is written only when step t+1's is staged.
    out = lambda i, v: {"index": np.array([i]), "image": np.full((1, 4), v, np.float32),
                        "text": np.full((1, 4), -v, np.float32)}
    bank.stage(out(1, 0.5), step=6)
    assert not bank.lookup([1])[MEMORY_SEEN].any()
    saved = {k: np.copy(v) for k, v in bank.state_dict().items()}  # includes the pending step-6 write
    other = MemoryBank(10, 4, "float16")
    other.load(saved)
    for b in (bank, other):
        b.stage(out(2, 0.25), step=7)
        assert b.lookup([1])[MEMORY_SEEN].all() and not b.lookup([2])[MEMORY_SEEN].any()
    for key in ("image", "text", "last_step"):
        np.testing.assert_array_equal(getattr(other, key), getattr(bank, key))
    with pytest.raises(ValueError, match="psd.memory_dtype must not change"):
        MemoryBank(10, 4, "float32").load(saved)


def test_bank_is_saved_in_the_checkpoint_step_and_async_save_is_a_snapshot(tmp_path):
    bank = MemoryBank(6, 3, "bfloat16")
    bank.write([0, 4], np.ones((2, 3)), 2 * np.ones((2, 3)), step=0)
    bank.stage({"index": jnp.array([5]), "image": jnp.ones((1, 3), jnp.bfloat16),
                "text": jnp.ones((1, 3), jnp.bfloat16)}, step=1)
    expected = {k: np.copy(v) for k, v in bank.state_dict().items()}
    ckpt = checkpointing.Checkpointer(str(tmp_path / "ck"))
    ckpt.save(1, {"x": jnp.zeros(2)}, None, force=True, memory=bank.state_dict())
    bank.write([0], 7 * np.ones((1, 3)), 7 * np.ones((1, 3)), step=2)  # while the save may still be running
    ckpt.save(2, {"x": jnp.zeros(2)}, None, force=True)  # a step without a bank
    ckpt.close()
    ckpt = checkpointing.Checkpointer(str(tmp_path / "ck"))
    restored = ckpt.restore_memory(1)
    assert ckpt.restore_memory(2) is None
    ckpt.close()
    assert sorted(restored) == sorted(expected)
    for k, v in expected.items():
        assert restored[k].dtype == v.dtype, k
        np.testing.assert_array_equal(restored[k], v, err_msg=k)


def test_memory_dtype_is_validated():
    checks.validate(tiny_config(**{"psd.teacher": "memory", "psd.memory_dtype": "bfloat16"}), num_data_shards=1)
    with pytest.raises(checks.ConfigError, match="psd.memory_dtype must be one of .*, got 'int8'"):
        checks.validate(tiny_config(**{"psd.teacher": "memory", "psd.memory_dtype": "int8"}), num_data_shards=1)


# --- the jitted step -------------------------------------------------------------------------------------------


def _memory_batches(dim):
    """test_step's two batches with bank rows: the first partly seen, the second never seen (as in epoch one)."""
    setup = list(_setup("memory"))
    rng = np.random.default_rng(1)
    seen = rng.random(B) < 0.6
    seen[:3] = [True, False, True]
    first = dict(setup[-1][0], **{MEMORY_IMAGE: _unit(rng, B, dim), MEMORY_TEXT: _unit(rng, B, dim),
                                  MEMORY_SEEN: seen})
    second = dict(setup[-1][1], **{MEMORY_IMAGE: np.zeros((B, dim), np.float32),
                                   MEMORY_TEXT: np.zeros((B, dim), np.float32), MEMORY_SEEN: np.zeros(B, bool)})
    setup[-1] = [first, second]
    return setup


# Two compiles keep the file fast: 8 devices run the ring-chunked loss inside 5-way gradient accumulation.
VARIANTS = {"1dev": (1, {}), "8dev_chunk_accum": (8, {"loss_chunk_size": 2, "grad_accum_steps": 5})}


@pytest.fixture(scope="module")
def step_runs():
    """Each variant's (final state, per-step metrics as numpy), compiled once for the tests below, and the
    student's embeddings of the first batch at the initial params."""
    setup = _memory_batches(tiny_config().model.embed_dim)
    out = {}
    for name, (devices, options) in VARIANTS.items():
        state, _, _, metrics = _run(sharding.make_mesh(devices), *setup, **options)
        out[name] = (state, jax.device_get(metrics))
    _, model, _, _, _, params, batches = setup
    first = jax.jit(model.apply)({"params": params}, batches[0]["image"], batches[0]["tokens"])
    return setup, out, first


_draw_subset = jax.jit(soft_targets.draw_subset, static_argnums=(1, 2, 3))


def _log_softmax(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _reference(u, v, s, mu, mv, seen, subset, alpha, tau):
    """float64 NumPy PSD loss with memory targets: T = s * U_old V_old^T over seen columns; rows in S that were
    seen get (1 - alpha) e_i + alpha softmax(T_i / tau), every other row its one-hot target."""
    u, v, mu, mv = (np.asarray(a, np.float64) for a in (u, v, mu, mv))
    sums = np.zeros(4)  # total, hard, soft over S, entropy over S
    n = 0
    for q, k, tq, tk in ((u, v, mu, mv), (v, u, mv, mu)):
        logp = _log_softmax(s * q @ k.T)
        hard = -np.diag(logp)
        t = np.where(seen[None, :], s * tq @ tk.T / tau, -np.inf)
        rows = subset & seen
        t = np.where(rows[:, None], t, 0.0)
        qsoft = np.exp(_log_softmax(t))
        soft = -(qsoft * logp).sum(1)
        ent = -(qsoft * np.log(np.where(qsoft > 0, qsoft, 1.0))).sum(1)
        sums += [np.where(rows, (1 - alpha) * hard + alpha * soft, hard).sum(), hard.sum(), soft[rows].sum(),
                 ent[rows].sum()]
        n += rows.sum()
    total, hard, soft, ent = sums / 2
    n = max(n / 2, 1)
    return {"loss": total / len(u), "loss_hard": hard / len(u), "loss_soft": soft / n, "teacher_entropy": ent / n}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_step_targets_equal_numpy_reference(step_runs, variant):
    """For each step the loss, its soft part and the teacher entropy equal the reference built from the bank rows
    and the embeddings the step hands back for storage (which are the student's own, at the step's params)."""
    (c, model, tx, lr, teach, params, batches), runs, (u0, v0, _) = step_runs
    _, metrics = runs[variant]
    key = jax.random.key(c.seed, impl="threefry2x32")
    for t, (batch, m) in enumerate(zip(batches, metrics)):
        stored = m["host"]
        np.testing.assert_array_equal(stored["index"], batch["index"])
        if t == 0:  # the stored embeddings are the student's forward pass at the step's params
            np.testing.assert_allclose(stored["image"], u0, atol=2e-6)
            np.testing.assert_allclose(stored["text"], v0, atol=2e-6)
        _, subset = _draw_subset(jax.random.fold_in(key, t), B, c.psd.subset_fraction, c.psd.subset_groups)
        if t == 0:  # the hand-made batch has seen and unseen rows in S, and unseen columns
            seen = batch[MEMORY_SEEN]
            assert (subset & seen).any() and (subset & ~seen).any() and not seen.all()
        ref = _reference(stored["image"], stored["text"], float(m["logit_scale"]), batch[MEMORY_IMAGE],
                         batch[MEMORY_TEXT], batch[MEMORY_SEEN], np.asarray(subset), c.psd.alpha_max,
                         c.psd.temperature)
        for name, value in ref.items():
            np.testing.assert_allclose(m[name], value, rtol=2e-5, atol=1e-6, err_msg=f"step {t} {name}")
        np.testing.assert_allclose(m["memory_seen"], batch[MEMORY_SEEN].mean(), rtol=1e-6)
    assert metrics[0]["loss_soft"] > 0 and metrics[0]["loss"] != metrics[0]["loss_hard"]
    # Nothing seen (the first epoch): exactly CLIP's InfoNCE, no soft term.
    assert metrics[1]["loss"] == metrics[1]["loss_hard"] and metrics[1]["loss_soft"] == 0


def test_sharded_step_equals_single_device(step_runs):
    _, runs, _ = step_runs
    (s1, m1), (s8, m8) = runs["1dev"], runs["8dev_chunk_accum"]
    np.testing.assert_allclose([m["loss"] for m in m8], [m["loss"] for m in m1], rtol=1e-5)
    for a, b in zip(m1, m8):
        for k in ("image", "text"):
            np.testing.assert_allclose(b["host"][k], a["host"][k], rtol=2e-5, atol=2e-6)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-6)


# --- the train loop --------------------------------------------------------------------------------------------

_JIT_TRAIN_STEP = train.jit_train_step
_COMPILED = []  # the runs below share one config: the later ones reuse the first one's jitted step (saves compiles)


def _train(workdir, monkeypatch, tokenizer="", **overrides):
    """train_and_evaluate on a 40-record split (2.5 batches of 16 per epoch); returns per-step host records."""
    c = tiny_config(**{"psd.teacher": "memory", "psd.ramp": "constant", "psd.memory_dtype": "bfloat16",
                       "data.train_size": 40, "num_steps": 8, "checkpoint_every": 3, "log_every": 4,
                       "num_devices": 1, "tokenizer.path": tokenizer, **overrides})
    c.evals = ml_collections.ConfigDict()
    records = []

    def recording(*args, **kwargs):
        if not _COMPILED:
            _COMPILED.append(_JIT_TRAIN_STEP(*args, **kwargs))
        step = _COMPILED[0]

        def run(state, batch):
            state, metrics, host = step(state, batch)
            records.append(jax.device_get({"index": batch["index"], "seen": batch[MEMORY_SEEN], **{
                k: metrics[k] for k in ("loss", "loss_hard", "loss_soft")}}))
            return state, metrics, host

        return run

    monkeypatch.setattr(train, "jit_train_step", recording)
    train.train_and_evaluate(c, workdir)
    return records


def _checkpoint(workdir, step):
    path = os.path.join(run_files.checkpoints_dir(workdir), str(step))
    state = ocp.StandardCheckpointer().restore(os.path.join(path, "state"))
    memory = ocp.StandardCheckpointer().restore(os.path.join(path, "memory"))
    return state, memory


def test_first_epoch_is_clip_then_memory_and_resume_is_bit_identical(tmp_path, monkeypatch):
    straight, sliced = str(tmp_path / "straight"), str(tmp_path / "sliced")
    steps = _train(straight, monkeypatch)
    assert len(steps) == 8
    index = [s["index"] for s in steps]
    # batch['index'] is the record index: bounded by the split, and the first epoch visits each record once.
    assert all(((i >= 0) & (i < 40)).all() for i in index)
    np.testing.assert_array_equal(np.sort(np.concatenate(index)[:40]), np.arange(40))
    # Lookups see every write up to two steps back (the previous step's is still pending).
    for t, s in enumerate(steps):
        before = np.concatenate(index[: max(t - 1, 0)] or [np.zeros(0, int)])
        np.testing.assert_array_equal(s["seen"], np.isin(s["index"], before), err_msg=f"step {t}")
    assert not steps[0]["seen"].any() and not steps[1]["seen"].any()
    for s in steps[:2]:  # the first epoch (alpha is already 0.5): exactly CLIP's loss
        assert s["loss"] == s["loss_hard"] and s["loss_soft"] == 0
    later = [s for s in steps if s["seen"].any()]
    assert later and all(s["loss_soft"] > 0 and s["loss"] != s["loss_hard"] for s in later)

    # Resume from the checkpoint of step 3 (params, optimizer, data position and bank saved together, as after a
    # stop). It holds step 2's still-pending write, and batches 2 and 3 share records, so a bank that had simply
    # been flushed at the save would give different targets at step 3.
    assert np.isin(index[3], index[2]).any()
    shutil.copytree(os.path.join(straight, "checkpoints", "3"), os.path.join(sliced, "checkpoints", "3"))
    resumed = _train(sliced, monkeypatch, tokenizer=os.path.join(straight, run_files.TOKENIZER_FILE))
    assert len(resumed) == 5
    for t, (a, b) in enumerate(zip(steps[3:], resumed), start=3):
        for k in a:
            np.testing.assert_array_equal(b[k], a[k], err_msg=f"step {t} {k}")
    (state_a, mem_a), (state_b, mem_b) = _checkpoint(straight, 8), _checkpoint(sliced, 8)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(state_a["params"]),
                            jax.tree.leaves(state_b["params"])):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    assert sorted(mem_a) == sorted(mem_b) and "pending_index" in mem_a
    for k in mem_a:
        np.testing.assert_array_equal(mem_a[k], mem_b[k], err_msg=k)
