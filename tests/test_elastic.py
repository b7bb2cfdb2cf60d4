"""Elastic resume: a run checkpointed on 8 devices in 2 processes continues on 4 devices, then on 1, in one
process, and ends where an uninterrupted 8-device run ends (up to float reduction order)."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_metric_io import read_events
from tiny import tiny_config

from softalign.config.errors import ConfigError
from softalign.objectives import soft_targets
from softalign.training import elastic, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_config.py")
RUN = {"num_steps": 6, "checkpoint_every": 2, "log_every": 1, "psd.subset_groups": 0}  # 0: the default strata


def test_default_strata_depend_on_the_batch_only():
    assert [soft_targets.resolve_groups(0, b) for b in (16, 40, 128, 1024, 32768)] == [1, 2, 8, 64, 256]
    assert soft_targets.resolve_groups(12, 48) == 12
    mesh8 = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(8, 1), ("data", "fsdp"))
    mesh1 = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    c = tiny_config(batch_size=128, **{"psd.subset_groups": 0})
    assert elastic.topology(c, mesh8)["subset_groups"] == elastic.topology(c, mesh1)["subset_groups"] == 8


def test_data_position_is_resplit_for_another_process_count():
    saved = {0: {"next_index": 16}, 1: {"next_index": 16}}  # 2 processes x 8 rows x 2 global batches
    assert elastic.translate_data_state(saved, 2, 16, 1, {"next_index": 0}) == ({"next_index": 32}, None)
    assert elastic.translate_data_state({0: {"next_index": 32}}, 1, 16, 4, {"next_index": 0}) == (
        {"next_index": 8}, None)
    state, note = elastic.translate_data_state({0: {"next_index": 17}, 1: {"next_index": 16}}, 2, 16, 1,
                                               {"next_index": 0})  # process 0 skipped a bad record
    assert state == {"next_index": 48} and "skipped as bad" in note
    with pytest.raises(ConfigError, match="data.num_workers=0"):
        elastic.translate_data_state(saved, 2, 16, 1, {"workers": []})
    with pytest.raises(ConfigError, match="incomplete"):
        elastic.translate_data_state({0: {"next_index": 16}}, 2, 16, 1, {"next_index": 0})


def test_describe_change():
    now = {"devices": 4, "processes": 1, "data_shards": 4, "fsdp": 1, "batch_size": 16, "subset_groups": 1}
    assert elastic.describe_change(None, now) is None and elastic.describe_change(dict(now), now) is None
    line = elastic.describe_change(dict(now, devices=8, processes=2), now)
    assert "8 devices / 2 processes" in line and "4 devices / 1 process;" in line and "NOT" not in line
    assert "S changes" in elastic.describe_change(dict(now, subset_groups=8), now)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(workdir, *overrides):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    address = f"127.0.0.1:{_free_port()}"
    args = [f"--config.{k}={v}" for k, v in RUN.items()] + list(overrides)
    procs = [subprocess.Popen([sys.executable, "-m", "softalign.main", f"--config={CONFIG}", f"--workdir={workdir}",
                               *args, f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    for p in procs:
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, out[-3000:]


def _params(workdir, step):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))["params"]


def _losses(workdir):
    return {e.step: v.simple_value for e in read_events(workdir) for v in e.summary.value if v.tag == "train/loss"}


def test_resume_on_fewer_devices_and_processes_equals_an_uninterrupted_run(tmp_path, capsys):
    straight, elastic_run = str(tmp_path / "straight"), str(tmp_path / "elastic")
    train.train_and_evaluate(tiny_config(num_devices=8, **RUN), straight)
    _two_processes(elastic_run, "--config.stop_at_step=2")  # 8 devices in 2 processes
    capsys.readouterr()
    train.train_and_evaluate(tiny_config(num_devices=4, stop_at_step=4, **RUN), elastic_run)
    out = capsys.readouterr().out
    assert "Restored checkpoint at step 2" in out
    assert "Elastic resume: the checkpoint was written on 8 devices / 2 processes, this run has 4 devices / " \
           "1 process; data order" in out
    train.train_and_evaluate(tiny_config(num_devices=1, **RUN), elastic_run)
    assert "written on 4 devices / 1 process, this run has 1 devices / 1 process" in capsys.readouterr().out
    a = [np.asarray(x) for x in jax.tree.leaves(_params(straight, 6))]
    b = [np.asarray(x) for x in jax.tree.leaves(_params(elastic_run, 6))]
    relative = np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, b)) / sum(np.sum(x ** 2) for x in a))
    print(f"8 devices (2 processes) -> 4 -> 1 vs 8 devices, 6 steps: relative L2 of params {relative:.2e}, "
          f"max |diff| {max(float(np.max(np.abs(x - y))) for x, y in zip(a, b)):.2e}")
    assert relative < 1e-5  # float32 reduction order only
    la, lb = _losses(straight), _losses(elastic_run)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([lb[k] for k in sorted(lb)], [la[k] for k in sorted(la)], rtol=1e-5)
