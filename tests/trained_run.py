"""A tiny run trained in a subprocess (tests/tiny_config.py), shared by the tools' and API's tests."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "tiny_config.py")
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


def run_module(module: str, *args: str, devices: int = 1, config: bool = True, timeout: int = 600):
    """``python -m module [--config=tiny] args`` in a fresh process on `devices` virtual CPU devices."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    cmd = [sys.executable, "-m", module, *([f"--config={TINY}"] if config else []), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def train_tiny(workdir: str, *overrides: str) -> str:
    """Trains the tiny config for 4 steps (checkpoints at 2 and 4) unless overridden; returns the workdir."""
    r = run_module("softalign.main", f"--workdir={workdir}", "--config.num_steps=4", "--config.checkpoint_every=2",
                   *overrides)
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir
