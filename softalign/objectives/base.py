"""The objective seam: what the train step hands an objective, and what it gets back.

The step embeds the batch, asks the teacher for soft targets, then calls ``objective(LossInputs(...))`` for
``(loss, metrics)``. An objective owns its sharded and chunked forms (it is built with the mesh) and may own
learnable leaves of its own (``init_params``, e.g. a sigmoid loss's bias), which live in ``params["objective"]``
beside the model's. New objectives are a new module plus one line in ``registry.OBJECTIVES``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Protocol

import jax
from jax.sharding import Mesh


class TeacherTargets(NamedTuple):
    """Teacher embeddings aligned with the global batch. ``valid[j]`` says whether row j has any.

    Teacher logits are ``scale * image_emb @ text_emb.T``; rows/columns that are not valid are excluded, so a
    teacher that embedded only S gives targets spread over S. A teacher that knows its target distribution
    outright (the synthetic ``oracle``) gives ``log_targets`` instead, which the loss then uses as the teacher
    logits (unchunked loss only; a row with no finite entry keeps its one-hot target).
    """

    image_emb: jax.Array  # (B, D)
    text_emb: jax.Array  # (B, D)
    scale: jax.Array  # ()
    valid: jax.Array  # (B,) bool
    log_targets: tuple[jax.Array, jax.Array] | None = None  # (i2t (B, B), t2i (B, B)) logits; -inf: no mass


class LossInputs(NamedTuple):
    """Everything an objective may read, for one global batch whose rows are split over the mesh."""

    image_emb: jax.Array  # (B, D) L2-normalised student image embeddings
    text_emb: jax.Array  # (B, D)
    scale: jax.Array  # () the model's logit scale, exp(t)
    params: dict[str, jax.Array]  # the objective's own learnable leaves ({} for none)
    targets: TeacherTargets | None  # the teacher's embeddings; None: the student's own logits (or no teacher)
    subset: jax.Array  # (B,) bool: rows that get soft targets this step (all False when soft targets are off)
    alpha: jax.Array  # () weight of the soft targets this step
    batch: dict[str, jax.Array]  # the global batch (``index`` and any extra fields a source provides)
    # what a wrapper of the objective reads beside the embeddings (A-CLIP's pooled features and BYOL target)
    features: dict[str, jax.Array] | None = None


@dataclasses.dataclass(frozen=True)
class ObjectiveContext:
    """What an objective is built from: the whole config, the mesh (None when only the config is checked), the
    global batch size and the number of data shards the batch is split over (what layout rules are checked on)."""

    config: Any
    mesh: Mesh | None
    batch_size: int
    num_data_shards: int = 1


class Objective(Protocol):
    """A loss on the embeddings. ``supports_soft_targets``: whether PSD's teacher targets apply to it."""

    name: str
    supports_soft_targets: bool

    def init_params(self) -> dict[str, jax.Array]: ...

    def __call__(self, inputs: LossInputs) -> tuple[jax.Array, dict[str, jax.Array]]: ...


ObjectiveBuilder = Callable[[ObjectiveContext], Objective]
