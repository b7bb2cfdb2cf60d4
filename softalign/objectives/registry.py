"""The registries behind ``config.objective.name`` and ``config.psd.teacher``: one line per objective or teacher.

A builder takes what it needs from the config and validates it in its constructor (``ValueError`` with the key
in the message); ``config.checks`` calls the builders rather than restating their rules.
"""

from __future__ import annotations

from typing import Any, Callable

from softalign.objectives import aclip, distill, infonce, mp_sigmoid, oracle, protoclip, siglip, teachers
from softalign.objectives.base import Objective, ObjectiveBuilder, ObjectiveContext

OBJECTIVES: dict[str, ObjectiveBuilder] = {
    "infonce": infonce.InfoNCE.from_context,  # symmetric InfoNCE with PSD soft targets (CLIP when alpha_max=0)
    "siglip": siglip.SigLIP.from_context,  # SigLIP's pairwise sigmoid loss, learnable bias; no PSD soft targets
    "protoclip": protoclip.ProtoCLIP.from_context,  # InfoNCE + ProtoCLIP's prototype loss (k-means of the bank)
    "distill": distill.Distill.from_context,  # TinyCLIP's affinity mimicking from a frozen external teacher
    "multi_positive_sigmoid": mp_sigmoid.MultiPositiveSigmoid.from_context,  # FLAME: K captions per image
}

TEACHERS: dict[str, Callable[[Any], teachers.Teacher]] = {
    "self": lambda psd: teachers.SelfTeacher(),
    "ema": lambda psd: teachers.EmaTeacher(psd.ema_momentum),
    "snapshot": lambda psd: teachers.SnapshotTeacher(psd.snapshot_every),
    "memory": lambda psd: teachers.MemoryTeacher(psd.get("memory_dtype", "float32")),
    "oracle": lambda psd: oracle.OracleTeacher(),  # synthetic only: targets from the exact ground truth
}


def make_objective(context: ObjectiveContext) -> Objective:
    """Builds the objective named by ``config.objective.name``, wrapped in A-CLIP's recipe when ``config.aclip``
    asks for its views or terms (``aclip.recipe_active``)."""
    name = context.config.objective.name
    if name not in OBJECTIVES:
        raise ValueError(f"objective.name={name!r} is not available; choose one of {sorted(OBJECTIVES)}")
    objective = OBJECTIVES[name](context)
    if context.config.get("aclip") is not None:
        aclip.check_recipe(context.config)
        if aclip.recipe_active(context.config):
            return aclip.AClip(objective, context.config)
    return objective


def make_teacher(psd_config: Any) -> teachers.Teacher:
    """Builds the teacher named by ``psd_config.teacher``."""
    name = psd_config.teacher
    if name not in TEACHERS:
        raise ValueError(f"psd.teacher={name!r} is not available; choose one of {sorted(TEACHERS)}")
    return TEACHERS[name](psd_config)
