"""End-to-end training: exact resume across a process restart, re-runs, clear config errors, NaN stops.

SIGTERM and kill -9 are in tests/test_faults.py, with the other injected faults."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tiny import tiny_config

from softalign.data import pipeline
from softalign.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_OVERRIDES = os.path.join(ROOT, "tests", "tiny.py")


def _main(workdir, *overrides, devices=1):
    """Runs ``python -m softalign.main`` on the tiny config in a fresh process."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    cmd = [sys.executable, "-m", "softalign.main", f"--config={os.path.join(ROOT, 'tests', 'tiny_config.py')}",
           f"--workdir={workdir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _params(workdir, step):
    path = os.path.join(workdir, "checkpoints", str(step), "state")
    restored = ocp.StandardCheckpointer().restore(path)
    return restored["params"]


def test_resume_after_restart_is_bit_identical(tmp_path):
    straight, sliced = str(tmp_path / "straight"), str(tmp_path / "sliced")
    r = _main(straight, "--config.num_steps=8", "--config.checkpoint_every=4")
    assert r.returncode == 0, r.stderr[-3000:]
    r1 = _main(sliced, "--config.num_steps=8", "--config.checkpoint_every=4", "--config.stop_at_step=4")
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert not os.path.exists(os.path.join(sliced, "checkpoints", "8"))
    r2 = _main(sliced, "--config.num_steps=8", "--config.checkpoint_every=4")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "Restored checkpoint at step 4" in r2.stdout
    a, b = _params(straight, 8), _params(sliced, 8)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
    # The final evaluation is identical too, and a finished run only re-evaluates.
    with open(os.path.join(straight, "eval_results.json")) as f1, open(os.path.join(sliced, "eval_results.json")) as f2:
        assert json.load(f1) == json.load(f2)
    r3 = _main(sliced, "--config.num_steps=8")
    assert r3.returncode == 0 and "Run complete (8/8 steps)" in r3.stdout
    assert "heldout i2t_R@5" in r3.stdout and "(chance" in r3.stdout


@pytest.mark.parametrize("overrides,message", [
    (["--config.batch_size=12"], "batch_size=12 must be a positive multiple of the 8"),
    (["--config.model.vision.patch_size=3"], "must be divisible by patch_size"),
    (["--config.no_such_key=1"], "no_such_key"),
    (["--config.psd.teacher=teleport"], "psd.teacher='teleport'"),
])
def test_bad_config_fails_fast_with_one_clear_line(tmp_path, overrides, message):
    r = _main(str(tmp_path / "w"), *overrides, devices=8)
    assert r.returncode != 0
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_workdir_parent(tmp_path):
    r = _main(str(tmp_path / "missing" / "w"))
    assert r.returncode == 2 and "parent directory" in r.stderr and "does not exist" in r.stderr


def test_nan_loss_stops_run_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real = pipeline.to_global_batch
    calls = []

    def poisoned(batch, sharding):
        """NaN images from the 6th batch (step index 5) on."""
        calls.append(1)
        if len(calls) >= 6:
            batch = dict(batch, image=np.full_like(batch["image"], np.nan))
        return real(batch, sharding)

    monkeypatch.setattr(pipeline, "to_global_batch", poisoned)
    workdir = str(tmp_path / "nan")
    config = tiny_config(num_steps=8, checkpoint_every=4, log_every=2, num_devices=1)
    with pytest.raises(train.NonFiniteLossError, match="non-finite at step 5") as err:
        train.train_and_evaluate(config, workdir)
    assert "last good checkpoint (step 4)" in str(err.value)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]


@pytest.mark.parametrize("overrides,message", [
    (["--config.data.source=webdataset"], "data.path is required for data.source='webdataset'"),
    (["--config.tokenizer.path=/nonexistent/tokenizer.json"],
     "tokenizer.path=/nonexistent/tokenizer.json does not exist"),
    (["--config.data.source=parquet"], "data.source='parquet' is not available"),
])
def test_bad_data_config_fails_fast(tmp_path, overrides, message):
    r = _main(str(tmp_path / "w"), *overrides)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
