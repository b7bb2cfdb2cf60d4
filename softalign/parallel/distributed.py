"""Multi-process start-up: ``jax.distributed.initialize`` from flags or from the cluster's environment.

Cloud TPU slices and SLURM jobs are detected by JAX itself; explicit ``--coordinator_address``,
``--num_processes`` and ``--process_id`` cover everything else (and the loopback test on one CPU machine).
Call :func:`initialize` before any other JAX call.
"""

from __future__ import annotations

import os

import jax
from absl import logging

# Environment variables whose presence means a multi-host launcher started this process.
_CLUSTER_HINTS = ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def _looks_multihost() -> bool:
    if "SLURM_NTASKS" in os.environ:
        return int(os.environ["SLURM_NTASKS"]) > 1
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if hosts:
        return len(hosts.split(",")) > 1
    return any(k in os.environ for k in _CLUSTER_HINTS)


def initialize(mode: str = "auto", coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_collectives: str = "gloo") -> bool:
    """Starts the multi-process runtime when asked or detected; returns whether it did.

    ``mode``: 'auto' (explicit flags, else the environment decides), 'on' (always; JAX auto-detects the cluster)
    or 'off'. On CPU, cross-process collectives use ``cpu_collectives`` (gloo).
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--multihost must be auto, on or off, got {mode!r}")
    explicit = coordinator_address is not None
    if mode == "off" or (mode == "auto" and not explicit and not _looks_multihost()):
        return False
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    kwargs = {}
    if explicit:
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kwargs)
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True
