"""Checks a config before anything is compiled, so a bad value fails in one clear line, not deep in XLA."""

from __future__ import annotations

import os
from typing import Any, Callable

import ml_collections

from softalign.config.errors import ConfigError
from softalign.data.sources import available_sources
from softalign.data.subset import subset_size
from softalign.models.clip import validate_model_config
from softalign.objectives import registry, soft_targets
from softalign.objectives.base import ObjectiveContext


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _constructed(build: Callable[[], Any]) -> Any:
    """Runs a constructor that validates its own arguments; its ``ValueError`` becomes a ``ConfigError``."""
    try:
        return build()
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_batch(config: Any, key: str, num_data_shards: int) -> None:
    value = config[key]
    _require(value > 0 and value % num_data_shards == 0,
             f"{key}={value} must be a positive multiple of the {num_data_shards} data-parallel devices")


def validate_eval(config: Any, *, num_devices: int) -> None:
    """The checks standalone evaluation needs (its batch is split over ``num_devices``)."""
    _check_batch(config, "eval_batch_size", num_devices)


def validate(config: Any, *, num_data_shards: int, workdir: str | None = None) -> None:
    """Raises ``ConfigError`` for values that cannot work on ``num_data_shards`` devices."""
    if workdir is not None and "://" not in workdir:  # remote (gs://) workdirs are created by the run
        parent = os.path.dirname(os.path.abspath(workdir)) or "/"
        _require(os.path.isdir(parent), f"--workdir={workdir}: parent directory {parent} does not exist")
    _require(config.num_steps > 0, f"num_steps must be positive, got {config.num_steps}")
    for key in ("batch_size", "eval_batch_size"):
        _check_batch(config, key, num_data_shards)
    model = config.model
    if model.text.vocab_size <= 0 or model.text.eot_id < 0:  # filled in from the tokenizer later
        model = ml_collections.ConfigDict(model.to_dict())
        model.text.vocab_size, model.text.eot_id = max(model.text.vocab_size, 2), 1
    try:
        validate_model_config(model)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    _require(config.model.vision.image_size == config.data.image_size,
             f"model.vision.image_size={config.model.vision.image_size} must equal "
             f"data.image_size={config.data.image_size}")
    _require(config.fsdp >= 1 and num_data_shards % config.fsdp == 0,
             f"fsdp={config.fsdp} must divide the {num_data_shards} devices")
    accum = config.grad_accum_steps
    _require(accum >= 1 and config.batch_size % (accum * num_data_shards) == 0,
             f"grad_accum_steps={accum} must be >= 1 and batch_size={config.batch_size} divisible by "
             f"grad_accum_steps x {num_data_shards} data shards")
    known = available_sources()
    _require(config.data.source in known,
             f"data.source={config.data.source!r} is not available; known sources: {known}")
    source = config.data.source
    _require(source in ("synthetic", "tfds") or bool(config.data.get("path", "")),
             f"data.path is required for data.source={source!r}: point it at the dataset's files")
    tok = config.tokenizer.path
    _require(not tok or "://" in tok or os.path.exists(tok), f"tokenizer.path={tok} does not exist")
    p = config.psd
    teacher = _constructed(lambda: registry.make_teacher(p))
    _require(not teacher.needs_truth or config.data.source == "synthetic",
             f"psd.teacher={p.teacher!r} needs the synthetic source's ground truth, not "
             f"data.source={config.data.source!r}")
    _require(not teacher.log_targets or config.loss_chunk_size == 0,
             f"psd.teacher={p.teacher!r} needs the unchunked loss: set loss_chunk_size=0")
    ramp_end = p.ramp_end if p.ramp_end >= 0 else config.num_steps
    _constructed(lambda: soft_targets.alpha_schedule(p.alpha_max, p.ramp, p.ramp_start, ramp_end))
    _require(0.0 <= p.alpha_max <= 1.0, f"psd.alpha_max={p.alpha_max} must be in [0, 1]")
    groups = p.subset_groups or num_data_shards
    _require(groups % num_data_shards == 0,
             f"psd.subset_groups={groups} must be a multiple of the {num_data_shards} data shards")
    _constructed(lambda: soft_targets.subset_layout(config.batch_size, p.subset_fraction, groups))
    objective = _constructed(lambda: registry.make_objective(ObjectiveContext(config, None, config.batch_size)))
    _require(objective.supports_soft_targets or p.alpha_max == 0,
             f"objective.name={config.objective.name!r} takes no PSD soft targets: set psd.alpha_max=0")
    o = config.optim
    _require(o.lr > 0 and o.warmup_steps >= 0 and o.weight_decay >= 0,
             "optim.lr must be positive; optim.warmup_steps and optim.weight_decay non-negative")
    fraction = config.data.get("train_fraction", 1.0)
    _require(isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0,
             f"data.train_fraction={fraction} must be in (0, 1]: the fraction of the train split to train on")
    records = subset_size(fraction, config.data.train_size)
    _require(config.data.source != "synthetic" or records >= config.batch_size,
             f"data.train_size={config.data.train_size}"
             + (f" x data.train_fraction={fraction:g} = {records} records" if fraction < 1.0 else "")
             + f" is smaller than one global batch ({config.batch_size})")
