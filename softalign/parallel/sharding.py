"""The device mesh and the shardings of the train state and batches.

The mesh has two axes, ``data`` and ``fsdp``. The global batch is split over both (every device holds different
rows). Train-state leaves (parameters, optimizer moments, teacher copies) are replicated. The exception is when
``fsdp > 1``: each leaf of at least ``fsdp_min_size`` elements is then split along its largest dimension that the
fsdp axis divides (ZeRO-3 style; XLA gathers the weights where a layer needs them). Explicit regex rules on the
leaf path take precedence.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch is split over both


def make_mesh(num_devices: int | None = None, devices: list | None = None, fsdp: int = 1) -> Mesh:
    """A (data, fsdp) mesh over the first ``num_devices`` devices (all by default), with Auto axis types."""
    devices = list(devices if devices is not None else jax.devices())
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices, only {len(devices)} are visible")
        devices = devices[:num_devices]
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"fsdp={fsdp} must divide the {len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), BATCH_AXES)


def num_batch_shards(mesh: Mesh) -> int:
    """How many ways the global batch is split."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp: int, min_size: int) -> P:
    """Shards the largest dimension divisible by ``fsdp`` if the leaf has at least ``min_size`` elements."""
    if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = FSDP_AXIS
            return P(*spec)
    return P()


def state_sharding(mesh: Mesh, abstract_state: Any, *, fsdp_min_size: int = 2**14,
                   rules: Sequence[tuple[str, tuple]] = ()) -> Any:
    """Sharding pytree for the train state: regex ``rules`` (path regex -> PartitionSpec entries) first, then the
    FSDP rule, else replicated."""
    compiled = [(re.compile(pattern), P(*spec)) for pattern, spec in rules]
    fsdp = mesh.shape[FSDP_AXIS]

    def leaf_sharding(path, leaf):
        name = jax.tree_util.keystr(path)
        for pattern, spec in compiled:
            if pattern.search(name):
                return NamedSharding(mesh, spec)
        return NamedSharding(mesh, fsdp_spec(getattr(leaf, "shape", ()), fsdp, fsdp_min_size))

    return jax.tree_util.tree_map_with_path(leaf_sharding, abstract_state)
