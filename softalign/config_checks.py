"""Checks a config before anything is compiled, so a bad value fails in one clear line, not deep in XLA."""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from softalign import memory_bank, psd
from softalign.data.sources import available_sources
from softalign.data.subset import subset_size
from softalign.models.clip import validate_model_config
from softalign.teachers import TEACHERS


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(config: Any, *, num_data_shards: int, workdir: str | None = None) -> None:
    """Raises ``ConfigError`` for values that cannot work on ``num_data_shards`` devices."""
    if workdir is not None and "://" not in workdir:  # remote (gs://) workdirs are created by the run
        parent = os.path.dirname(os.path.abspath(workdir)) or "/"
        _require(os.path.isdir(parent), f"--workdir={workdir}: parent directory {parent} does not exist")
    _require(config.num_steps > 0, f"num_steps must be positive, got {config.num_steps}")
    for key in ("batch_size", "eval_batch_size"):
        value = config[key]
        _require(value > 0 and value % num_data_shards == 0,
                 f"{key}={value} must be a positive multiple of the {num_data_shards} data-parallel devices")
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
    _require(config.loss_chunk_size >= 0, f"loss_chunk_size={config.loss_chunk_size} must be >= 0 (0: unchunked)")
    known = available_sources()
    _require(config.data.source in known,
             f"data.source={config.data.source!r} is not available; known sources: {known}")
    source = config.data.source
    _require(source in ("synthetic", "tfds") or bool(config.data.get("path", "")),
             f"data.path is required for data.source={source!r}: point it at the dataset's files")
    tok = config.tokenizer.path
    _require(not tok or "://" in tok or os.path.exists(tok), f"tokenizer.path={tok} does not exist")
    p = config.psd
    _require(p.teacher in TEACHERS, f"psd.teacher={p.teacher!r} is not one of {sorted(TEACHERS)}")
    _require(p.ramp in psd.RAMPS, f"psd.ramp={p.ramp!r} is not one of {psd.RAMPS}")
    _require(0.0 <= p.alpha_max <= 1.0, f"psd.alpha_max={p.alpha_max} must be in [0, 1]")
    _require(p.temperature > 0, f"psd.temperature={p.temperature} must be positive")
    _require(0.0 <= p.subset_fraction <= 1.0, f"psd.subset_fraction={p.subset_fraction} must be in [0, 1]")
    groups = p.subset_groups or num_data_shards
    _require(groups % num_data_shards == 0 and config.batch_size % groups == 0,
             f"psd.subset_groups={groups} must be a multiple of the {num_data_shards} data shards and divide "
             f"batch_size={config.batch_size}")
    _require(0.0 <= p.ema_momentum < 1.0, f"psd.ema_momentum={p.ema_momentum} must be in [0, 1)")
    _require(p.snapshot_every > 0, f"psd.snapshot_every={p.snapshot_every} must be positive")
    _require(p.memory_dtype in memory_bank.DTYPES,
             f"psd.memory_dtype={p.memory_dtype!r} is not one of {sorted(memory_bank.DTYPES)}")
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
