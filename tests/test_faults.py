"""Fault injection: what a hostile user, a full disk, a preemption or a kill -9 does to a run, and that each
ends in one clear line, with every good checkpoint kept and no run marked finished that is not.

Checkpoint failures are simulated by monkeypatching (a failing async write, a failing synchronous item, a disk
reported full), so no real small disk is needed. Config mistakes are checked in-process (`checks.validate`, as
the run calls it); two subprocess cases prove the CLI's single line and exit code 2 before anything compiles.
"""

import errno
import os
import signal
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tiny import tiny_config

from softalign.config import checks
from softalign.config.errors import ConfigError
from softalign.data import skips
from softalign.data.tokenizer import Tokenizer
from softalign.evaluation import suite
from softalign.sweep import plan
from softalign.training import checkpointing, setup, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_config.py")
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def _env(devices=1):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))


def _cmd(workdir, *overrides):
    return [sys.executable, "-m", "softalign.main", f"--config={CONFIG}", f"--workdir={workdir}", *overrides]


def _restore(workdir, step):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def _all_finite(tree):
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.inexact))


# ----------------------------------------------------------------------------- non-finite state


def test_overflowing_update_stops_before_saving_it(tmp_path):
    """lr 3.4e38 after one warm-up step at lr 0: the loss and gradient stay finite, the update overflows."""
    workdir = str(tmp_path / "inf")
    config = tiny_config(num_steps=8, checkpoint_every=1, log_every=1, num_devices=1,
                         **{"optim.lr": 3.4e38, "optim.warmup_steps": 1})
    with pytest.raises(train.NonFiniteLossError, match="non-finite by step 2") as err:
        train.train_and_evaluate(config, workdir)
    assert "last good checkpoint (step 1) is kept" in str(err.value)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]
    kept = _restore(workdir, 1)
    assert _all_finite(kept["params"]) and _all_finite(kept["opt_state"]) and _all_finite(kept["teacher"])
    assert not os.path.exists(os.path.join(workdir, "done.json"))


# ----------------------------------------------------------------------------- failed checkpoint saves


def _state():
    return {"w": jax.numpy.arange(4096.0).reshape(64, 64), "step": jax.numpy.int32(0)}


def _failing_async_save(monkeypatch, fail_steps):
    """Makes the background write of the ``state`` item fail with ENOSPC for the step folders in ``fail_steps``
    (the real write still runs first, as a disk that fills up mid-write); returns the list of saved step names."""
    real = ocp.StandardCheckpointHandler.async_save
    calls = []

    async def save(self, directory, *args, **kwargs):
        futures = await real(self, directory, *args, **kwargs)
        if not directory.name.startswith("state"):  # the memory teacher's bank is an item of its own
            return futures
        step = directory.parent.name.split(".")[0]  # <step>.orbax-checkpoint-tmp/state...
        calls.append(step)
        if int(step) in fail_steps:
            failed = ocp.future.CommitFutureAwaitingContractedSignals(_raise_enospc(), name="disk_full")
            return list(futures or []) + [failed]
        return futures

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", save)
    return calls


async def _raise_enospc():
    raise ENOSPC


def test_failed_async_save_is_reported_once_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    _failing_async_save(monkeypatch, {2})
    ckpt = checkpointing.Checkpointer(str(tmp_path / "ck"))
    ckpt.save(1, _state(), None)
    ckpt.wait()
    ckpt.save(2, _state(), None)
    deadline = time.time() + 60
    while not ckpt.save_failed():  # the loop asks this every step; Orbax alone would say so only at the next save
        assert time.time() < deadline, "the failed save was never reported"
        time.sleep(0.05)
    message = str(ckpt.failure)
    assert "checkpoint of step 2" in message and str(tmp_path / "ck") in message
    assert "no space left on device" in message and "free of" in message and "steps 1" in message
    assert "\n" not in message
    for _ in range(2):  # Orbax raises a background error once per thread; the failure stays reported
        with pytest.raises(checkpointing.CheckpointSaveError, match="step 2"):
            ckpt.wait()
    with pytest.raises(checkpointing.CheckpointSaveError):
        ckpt.save(3, _state(), None)
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "ck")) == ["1"]  # the partial step 2 was removed, step 1 kept


def test_failed_synchronous_item_and_a_disk_too_full_for_the_next_save(tmp_path, monkeypatch):
    ckpt = checkpointing.Checkpointer(str(tmp_path / "ck"), async_save=False)
    it = iter(grain.MapDataset.range(10).to_iter_dataset())
    ckpt.save(1, _state(), it)
    real = checkpointing.shutil.disk_usage
    monkeypatch.setattr(checkpointing.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=1000))  # less than the last checkpoint's size
    with pytest.raises(checkpointing.CheckpointSaveError, match="step 2 .* was not started: it needs about"):
        ckpt.save(2, _state(), it)
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", real)
    ckpt2 = checkpointing.Checkpointer(str(tmp_path / "ck2"))

    def broken(self, directory, item=None, args=None):
        raise ENOSPC

    monkeypatch.setattr(grain.checkpoint.CheckpointHandler, "save", broken)  # the Grain item is written in-line
    with pytest.raises(checkpointing.CheckpointSaveError, match="step 5 .*failed: no space left on device"):
        ckpt2.save(5, _state(), it)
    ckpt2.close()
    ckpt.close()
    assert sorted(os.listdir(tmp_path / "ck")) == ["1"] and os.listdir(tmp_path / "ck2") == []


@pytest.mark.parametrize("fail_at,num_steps,kept", [(4, 8, ["2"]), (4, 4, ["2"])],
                         ids=["mid-run", "final-save"])
def test_training_stops_at_the_first_failed_save_and_is_not_finished(tmp_path, monkeypatch, fail_at, num_steps,
                                                                     kept):
    calls = _failing_async_save(monkeypatch, {fail_at})
    workdir = str(tmp_path / "w")
    config = tiny_config(num_steps=num_steps, checkpoint_every=2, log_every=1, num_devices=1)
    with pytest.raises(checkpointing.CheckpointSaveError, match=f"checkpoint of step {fail_at} .*no space left"):
        train.train_and_evaluate(config, workdir)
    assert calls == ["2", "4"]  # stopped before any later save was attempted
    assert sorted(s for s in os.listdir(os.path.join(workdir, "checkpoints"))) == kept
    assert not os.path.exists(os.path.join(workdir, "done.json"))
    assert not os.path.exists(os.path.join(workdir, "eval_results.json"))
    assert plan.run_status(workdir, num_steps) == "partial"  # the sweep launcher will run it again


# ----------------------------------------------------------------------------- held-out captions


def _val_shard(path, rng):
    """A held-out tar: 6 good pairs, a non-UTF-8, an empty and a whitespace-only caption, a truncated image."""
    from data_fixtures import BAD_CAPTIONS, jpeg, write_tar
    members = []
    for i in range(6):
        members += [(f"good{i}.jpg", jpeg(rng, 40, 30)), (f"good{i}.txt", f"a photo number {i}".encode())]
    for reason, caption in BAD_CAPTIONS.items():
        members += [(f"{reason}.jpg", jpeg(rng, 40, 30)), (f"{reason}.txt", caption)]
    image = jpeg(rng, 40, 30)
    members += [("cut.jpg", image[: len(image) // 2]), ("cut.txt", b"a truncated photo")]
    write_tar(path, members)


def test_heldout_evaluation_skips_and_counts_bad_captions_and_images(tmp_path):
    rng = np.random.default_rng(0)
    shards = tmp_path / "shards"
    shards.mkdir()
    _val_shard(str(shards / "val-00000.tar"), rng)
    config = tiny_config(**{"data.source": "webdataset", "data.path": str(shards)})
    config.evals = {"heldout": {"kind": "retrieval", "split": "heldout"}}
    tok = Tokenizer.train_bpe(["a photo number one two three"] * 20, vocab_size=300, context_length=24)
    skips.reset()
    (evaluator,) = suite.build_evaluators(config, tok)  # crashed with UnicodeDecodeError before
    projection = np.random.default_rng(1).normal(size=(8 * 8 * 3, 16))
    metrics = evaluator.run(lambda x: np.asarray(x).reshape(len(x), -1) @ projection,
                            lambda t: np.eye(16)[np.asarray(t)[:, 1] % 16])
    assert metrics["skipped/caption_not_utf8"] == 1
    assert metrics["skipped/empty_caption"] == 1 and metrics["skipped/whitespace_caption"] == 1
    assert metrics["skipped/truncated_image"] == 1 and metrics["skipped_images"] == 4
    assert evaluator.chance["t2i_R@1"] == pytest.approx(1 / 6)  # chance of the 6 scored pairs, not of 10 records
    assert "heldout skipped/empty_caption = 1" in suite.report_lines("heldout", metrics, evaluator.chance)


# ----------------------------------------------------------------------------- config mistakes


def _readonly(tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes through mode bits: report the directory read-only as a ro mount would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, **k: False if str(p) == str(ro) and m & os.W_OK
                            else real(p, m, **k))
    else:
        ro.chmod(0o555)
    return str(ro / "w")


def _bad_cases(tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "tokdir").mkdir()
    (tmp_path / "tok.txt").write_text("not json")
    ok = str(tmp_path / "w")
    return {  # name: (workdir, overrides, message)
        "workdir is a file": (str(afile), {}, "is a file, not a directory"),
        "read-only workdir": (_readonly(tmp_path, monkeypatch), {}, "is not writable"),
        "num_devices=4 on 1": (ok, {"num_devices": 4}, "num_devices=4 but only 1 device is visible"),
        "num_devices=3 on 1": (ok, {"num_devices": 3}, "num_devices=3 but only 1 device is visible"),
        "tokenizer dir": (ok, {"tokenizer.path": str(tmp_path / "tokdir")}, "is a directory"),
        "tokenizer not json": (ok, {"tokenizer.path": str(tmp_path / "tok.txt")}, "is not a tokenizer.json"),
        "webdataset missing": (ok, {"data.source": "webdataset", "data.path": "/nonexistent/shards"},
                               "no such file or folder"),
        "patch_size=0": (ok, {"model.vision.patch_size": 0}, "model.vision.patch_size=0 must be a positive"),
        "context_length=0": (ok, {"model.text.context_length": 0}, "model.text.context_length=0 must be >= 2"),
        "log_every=0": (ok, {"log_every": 0}, "log_every=0 must be >= 1"),
        "checkpoint_every=0": (ok, {"checkpoint_every": 0}, "checkpoint_every=0 must be >= 1"),
        "keep_checkpoints=0": (ok, {"keep_checkpoints": 0}, "keep_checkpoints=0 must be >= 1"),
        "ramp_start>ramp_end": (ok, {"psd.ramp_start": 10, "psd.ramp_end": 5}, "psd.ramp_start=10 is after"),
    }


def test_every_bad_config_is_one_config_error_before_compiling(tmp_path, monkeypatch):
    """As build_run calls the checks, on a machine with one device."""
    for name, (workdir, overrides, message) in _bad_cases(tmp_path, monkeypatch).items():
        config = tiny_config(**overrides)
        with pytest.raises(ConfigError) as err:
            checks.validate(config, num_data_shards=setup.device_count(config), workdir=workdir,
                            available_devices=1)
        assert message in str(err.value), (name, str(err.value))
        assert "\n" not in str(err.value), name
    checks.validate(tiny_config(), num_data_shards=1, workdir=str(tmp_path / "w"), available_devices=1)


@pytest.mark.parametrize("overrides,message", [
    (["--config.log_every=0"], "softalign: config error: log_every=0 must be >= 1"),
    (["--config.num_devices=4"], "softalign: config error: num_devices=4 but only 1 device is visible"),
])
def test_cli_prints_one_line_and_exits_2_before_compiling(tmp_path, overrides, message):
    started = time.time()
    r = subprocess.run(_cmd(str(tmp_path / "w"), *overrides), cwd=ROOT, env=_env(1), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "w" / "checkpoints")
    assert time.time() - started < 120


# ----------------------------------------------------------------------------- signals and kill -9


def _start(workdir, log_path, *overrides):
    log = open(log_path, "w")
    return subprocess.Popen(_cmd(workdir, *overrides), cwd=ROOT, env=_env(1), stdout=log, stderr=subprocess.STDOUT)


def _wait_for(log_path, text, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(log_path) as f:
            if text in f.read():
                return
        assert proc.poll() is None, open(log_path).read()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared")


def test_sigterm_early_or_late_exits_cleanly_and_kill9_loses_nothing(tmp_path):
    workdir = str(tmp_path / "w")
    many = ["--config.num_steps=100000", "--config.checkpoint_every=50", "--config.log_every=5"]
    # SIGTERM while the tokenizer trains (before the loop, before anything compiled): exit 0, nothing saved.
    proc = _start(workdir, tmp_path / "early.log", *many)
    _wait_for(tmp_path / "early.log", "Building the tokenizer", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, open(tmp_path / "early.log").read()[-3000:]
    log = open(tmp_path / "early.log").read()
    assert "SIGTERM received" in log and "exiting cleanly" in log and "Traceback" not in log
    assert not os.path.isdir(os.path.join(workdir, "checkpoints")) or not os.listdir(
        os.path.join(workdir, "checkpoints"))
    # SIGTERM mid-training: a checkpoint, exit 0.
    proc = _start(workdir, tmp_path / "a.log", *many)
    _wait_for(tmp_path / "a.log", "] [10] train/", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    assert "SIGTERM received" in open(tmp_path / "a.log").read()
    saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
    assert saved and 10 <= saved[-1] < 100000
    # kill -9 at an arbitrary point (possibly mid-save): the next start still restores a complete checkpoint.
    proc = _start(workdir, tmp_path / "b.log", *many)
    _wait_for(tmp_path / "b.log", f"Restored checkpoint at step {saved[-1]}", proc)
    _wait_for(tmp_path / "b.log", "Checkpoint of step", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc = _start(workdir, tmp_path / "c.log", *many)
    _wait_for(tmp_path / "c.log", "Restored checkpoint at step", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    assert not os.path.exists(os.path.join(workdir, "done.json"))
