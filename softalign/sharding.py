"""The device mesh and the shardings of the train state and batches.

One code path for one CPU or a pod: a ``Mesh`` with a ``data`` axis over which the global batch is sharded.
Parameters, optimizer and teacher state are replicated here; FSDP rules extend ``state_sharding``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None, devices: list | None = None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (all by default), with Auto axis types."""
    devices = list(devices if devices is not None else jax.devices())
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices, only {len(devices)} are visible")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the data axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def state_sharding(mesh: Mesh, abstract_state: Any) -> Any:
    """Sharding pytree for the train state (replicated leaves)."""
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)
