"""Loads ``objective.name="distill"``'s frozen teacher (and, with ``distill.inherit``, the student's first params).

``distill.teacher`` is a finished softalign run's workdir (only ``params`` of its latest checkpoint are read, its
model from its ``config.json``) or a weight file: open_clip / OpenAI (``.safetensors``/``.pt``/``.bin``, the
architecture inferred unless ``distill.teacher_config`` names a preset) or softalign ``.msgpack`` (needs
``distill.teacher_config``). A workdir teacher also lends the student its tokenizer (the two must read the same
token ids); a weight file needs ``tokenizer.path`` set to the tokenizer it was trained with.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from softalign import workdir as run_files
from softalign.config.errors import ConfigError
from softalign.interop import weight_files, weights
from softalign.models import abstract_params
from softalign.models.inherit import inherit
from softalign.models.presets import model_preset
from softalign.objectives.distill import ExternalTeacher
from softalign.training import checkpointing


def _is_workdir(path: str) -> bool:
    return os.path.isdir(path)


def teacher_tokenizer_file(config: Any) -> str | None:
    """The tokenizer.json of a workdir ``distill.teacher`` when the run sets no ``tokenizer.path``, else None."""
    if config.objective.name != "distill" or config.tokenizer.path:
        return None
    source = config.distill.teacher
    path = os.path.join(source, run_files.TOKENIZER_FILE)
    return path if _is_workdir(source) and os.path.exists(path) else None


def model_config_of(source: str, preset: str = "") -> ml_collections.ConfigDict:
    """The ``model`` section of a teacher or inheritance source (see the module docstring)."""
    if preset:
        return model_preset(preset)
    if _is_workdir(source):
        saved = os.path.join(source, run_files.CONFIG_FILE)
        if not os.path.exists(saved):
            raise ConfigError(f"{saved} is missing: is {source} a finished softalign run?")
        with open(saved) as f:
            return ml_collections.ConfigDict(json.load(f)["model"])
    if source.endswith(".msgpack"):
        raise ConfigError(f"{source}: softalign params do not say their architecture; set distill.teacher_config")
    sd = weight_files.load_state_dict(source)
    return weights.infer_model_config({k: v for k, v in sd.items() if not weights.is_ignored(k)})


def load_source(source: str, preset: str = "") -> tuple[ml_collections.ConfigDict, Any]:
    """``(model config, params as numpy)`` of a workdir or weight file."""
    model_config = model_config_of(source, preset)
    try:
        if _is_workdir(source):
            local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # each process reads its own copy
            abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=local),
                                    abstract_params(model_config))
            params, step, path = checkpointing.restore_params(source, abstract)
            logging.info("distill: read %s (step %d)", path, step)
            return model_config, jax.device_get(params)
        return model_config, weights.load_pretrained(source, model_config)
    except (OSError, ValueError) as e:
        raise ConfigError(f"distill: cannot read {source}: {e}") from None


def _check_compatible(teacher_cfg: Any, config: Any) -> None:
    student = config.model
    for key, have, want in (("vision.image_size", teacher_cfg.vision.image_size, student.vision.image_size),
                            ("text.context_length", teacher_cfg.text.context_length, student.text.context_length),
                            ("text.eot_id", teacher_cfg.text.eot_id, student.text.eot_id)):
        if have != want:
            raise ConfigError(f"distill.teacher reads model.{key}={have}, the student model.{key}={want}: the "
                              "teacher embeds the student's batch, so they must agree")
    if teacher_cfg.text.vocab_size < student.text.vocab_size:
        raise ConfigError(f"distill.teacher's vocabulary ({teacher_cfg.text.vocab_size}) is smaller than the "
                          f"student's tokenizer ({student.text.vocab_size})")


def attach(teacher: ExternalTeacher, config: Any) -> ExternalTeacher:
    """Loads ``config.distill.teacher`` into ``teacher`` (once; the config must be resolved)."""
    if teacher.attached:
        return teacher
    d = config.distill
    if not _is_workdir(d.teacher) and not config.tokenizer.path:
        raise ConfigError(f"distill.teacher={d.teacher} is a weight file: set tokenizer.path to the tokenizer it "
                          "was trained with (e.g. CLIP's BPE), so student and teacher read the same token ids")
    model_config, params = load_source(d.teacher, d.teacher_config)
    _check_compatible(model_config, config)
    size = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    logging.info("distill: teacher %s, %s params", weights.describe(model_config), f"{size:,}")
    return teacher.attach(model_config, params)


def initial_params(config: Any, workdir: str, teacher: Any) -> Any:
    """The params a fresh run starts from: inherited when ``distill.inherit`` (from ``distill.inherit_from``, or
    the teacher), else ``init_from``'s (``interop.weights.init_from_params``); None for a random init or a resume."""
    d = config.get("distill", None)
    if config.objective.name != "distill" or d is None or not d.inherit:
        return weights.init_from_params(config, workdir)
    checkpoints = run_files.checkpoints_dir(workdir)
    if os.path.isdir(checkpoints) and any(p.isdigit() for p in os.listdir(checkpoints)):
        return None  # a resumed run continues from its own weights
    if d.inherit_from:
        source_cfg, source_params = load_source(d.inherit_from, d.get("inherit_config", ""))
    else:
        source_cfg, source_params = teacher.model_config, teacher.params
    try:
        params = inherit(source_params, source_cfg, config.model)
    except ValueError as e:
        raise ConfigError(f"distill.inherit: {e}") from None
    count = lambda p: sum(int(np.size(x)) for x in jax.tree.leaves(p))
    message = (f"Weight inheritance: {count(source_params):,} -> {count(params):,} params "
               f"({100.0 * count(params) / count(source_params):.1f}%)")
    print(message, flush=True)
    logging.info("%s", message)
    return params
