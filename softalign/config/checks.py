"""Checks a config before anything is compiled, so a bad value fails in one clear line, not deep in XLA."""

from __future__ import annotations

import glob
import os
from typing import Any, Callable

import ml_collections

from softalign.config.errors import ConfigError
from softalign.data import synthetic
from softalign.data.registry import resolve_split, shard_paths
from softalign.data.sources import available_sources
from softalign.data.subset import subset_size
from softalign.data.tokenizer import Tokenizer
from softalign.models.clip import validate_model_config
from softalign.objectives import registry, soft_targets, teachers
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


def _check_devices(config: Any, available: int | None) -> None:
    """``num_devices`` (<= 0: all) must not ask for more devices than JAX sees."""
    if available is not None and config.num_devices > available:
        raise ConfigError(f"num_devices={config.num_devices} but only {available} device"
                          f"{'s are' if available != 1 else ' is'} visible (jax.device_count()); "
                          "use num_devices=-1 for all of them")


def validate_eval(config: Any, *, num_devices: int, available_devices: int | None = None) -> None:
    """The checks standalone evaluation needs (its batch is split over ``num_devices``)."""
    _check_devices(config, available_devices)
    _check_batch(config, "eval_batch_size", num_devices)


def _check_workdir(workdir: str) -> None:
    """The workdir is a directory (or can be made one) that this process can write."""
    if "://" in workdir:  # remote (gs://) workdirs are created by the run
        return
    path = os.path.abspath(workdir)
    _require(not os.path.exists(path) or os.path.isdir(path), f"--workdir={workdir} is a file, not a directory")
    existing = path if os.path.isdir(path) else os.path.dirname(path) or "/"
    _require(os.path.isdir(existing), f"--workdir={workdir}: parent directory {existing} does not exist")
    _require(os.access(existing, os.W_OK | os.X_OK),
             f"--workdir={workdir}: {existing} is not writable (read-only file system or no permission)")
    for name in ("checkpoints", "tokenizer.json", "eval_results.json", "done.json"):
        inner = os.path.join(path, name)  # e.g. a read-only checkpoints/ inside a writable workdir
        _require(not os.path.exists(inner) or os.access(inner, os.W_OK),
                 f"--workdir={workdir}: {inner} is not writable")


def _check_tokenizer(config: Any) -> None:
    """A given tokenizer.path must be a tokenizer.json the tokenizers library reads; a trained one needs room for
    the byte alphabet."""
    tok = config.tokenizer.path
    if not tok:
        _require(config.tokenizer.vocab_size >= 259 and config.tokenizer.num_captions > 0,
                 f"tokenizer.vocab_size={config.tokenizer.vocab_size} must be >= 259 (a byte-level BPE) and "
                 f"tokenizer.num_captions={config.tokenizer.num_captions} positive")
        return
    if "://" in tok:
        return
    _require(os.path.exists(tok), f"tokenizer.path={tok} does not exist")
    _require(not os.path.isdir(tok), f"tokenizer.path={tok} is a directory: point it at a tokenizer.json file")
    try:
        Tokenizer.from_file(tok, max(2, config.model.text.context_length))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception for a bad file
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"tokenizer.path={tok} is not a tokenizer.json the tokenizers library can read "
                          f"({detail})") from None


def _check_data_path(config: Any) -> None:
    """The local files of a file-based source exist (resolved as the source will resolve them)."""
    data, source = config.data, config.data.source
    path = str(data.get("path", "") or "")
    if not path or "://" in path:
        return
    split = resolve_split(data, "train")
    extension = {"webdataset": ".tar", "arrayrecord": ".array_record"}.get(source)
    if extension:
        try:
            shard_paths(path, split, extension, train=True)
        except ValueError as e:
            raise ConfigError(f"data.path={path} (data.source={source!r}): {e}") from None
    elif source == "folder":
        _require(os.path.isdir(os.path.expanduser(path)), f"data.path={path} is not a folder (data.source='folder')")
    elif source == "tfds" and not any(ch in path for ch in "*?["):
        _require(os.path.isdir(os.path.expanduser(path)) or bool(glob.glob(path)),
                 f"data.path={path} (the TFDS data_dir) does not exist")


def _check_model(model: Any) -> None:
    """Sizes that must be positive, before anything divides by them."""
    v, t = model.vision, model.text
    for key, value in (("vision.image_size", v.image_size), ("vision.patch_size", v.patch_size),
                       ("vision.width", v.width), ("vision.depth", v.depth), ("vision.num_heads", v.num_heads),
                       ("text.width", t.width), ("text.depth", t.depth), ("text.num_heads", t.num_heads),
                       ("embed_dim", model.embed_dim)):
        _require(isinstance(value, int) and value >= 1, f"model.{key}={value} must be a positive integer")
    _require(t.context_length >= 2, f"model.text.context_length={t.context_length} must be >= 2 "
                                    "(start and end of text)")


# evaluator kinds that never encode caption strings: the ones a precomputed-text model can run
TEXT_FREE_EVALS = ("embedding_retrieval", "linear_probe")
PRECOMPUTED_OBJECTIVES = ("infonce", "siglip", "multi_positive_sigmoid")


def _check_text_embeddings(config: Any) -> None:
    """data.text_embedding_shape and model.text.kind='precomputed' agree, and the rest of the run can use them."""
    shape = tuple(config.data.get("text_embedding_shape", ()) or ())
    _require(len(shape) in (0, 2) and all(isinstance(s, int) and s >= 1 for s in shape),
             f"data.text_embedding_shape={shape} must be () or (K, D_in) with K, D_in >= 1")
    facets = shape[0] if shape else 1
    _require(facets == 1 or config.objective.name == "multi_positive_sigmoid",
             f"data.text_embedding_shape={shape}: K={facets} facets per record need "
             f"objective.name='multi_positive_sigmoid' (objective.name={config.objective.name!r} takes one text per "
             "image)")
    if config.model.text.get("kind", "transformer") != "precomputed":
        return
    filled = bool(config.get("lit", {}).get("embeddings_from", ""))  # lit.embeddings_from fills both in
    _require(filled or (len(shape) == 2 and shape[1] == config.model.text.input_dim),
             f"model.text.kind='precomputed' reads data.text_embedding_shape=(K, model.text.input_dim): got "
             f"{shape} and input_dim={config.model.text.input_dim}")
    _require(config.objective.name in PRECOMPUTED_OBJECTIVES,
             f"model.text.kind='precomputed' trains with objective.name in {PRECOMPUTED_OBJECTIVES}, not "
             f"{config.objective.name!r}")
    _require(config.psd.alpha_max == 0 and config.grad_accum_steps == 1,
             "model.text.kind='precomputed': set psd.alpha_max=0 and grad_accum_steps=1 (PSD's teachers and the "
             "accumulated step embed tokens)")
    check_text_free_evals(config, config.evals)


def check_text_free_evals(config: Any, evals: Any) -> None:
    """A precomputed-text model cannot embed caption strings: only text-free evaluators (embedding_retrieval reads
    the split's own text embeddings). Checked at config time and again when evaluators are built."""
    model = getattr(config, "model", None)  # evaluation-only configs (e.g. a data section alone) have no model
    if model is None or model.text.get("kind", "transformer") != "precomputed":
        return
    for name, spec in evals.items():
        kind = spec.get("kind") if hasattr(spec, "get") else None
        _require(kind in TEXT_FREE_EVALS,
                 f"evals.{name}.kind={kind!r} encodes caption strings, which model.text.kind='precomputed' cannot: "
                 f"use one of {TEXT_FREE_EVALS} (embedding_retrieval ranks the split's own text_embedding)")


def _check_loop(config: Any) -> None:
    """The loop's periods and the checkpoints it keeps."""
    for key in ("log_every", "checkpoint_every"):
        _require(config[key] >= 1, f"{key}={config[key]} must be >= 1 (steps between "
                                   f"{'train-metric logs' if key == 'log_every' else 'checkpoints'})")
    _require(config.keep_checkpoints >= 1,
             f"keep_checkpoints={config.keep_checkpoints} must be >= 1: with none kept a rerun could not resume")
    for name, spec in config.evals.items():
        every = spec.get("every", 0) if hasattr(spec, "get") else 0
        _require(every is None or every >= 0, f"evals.{name}.every={every} must be >= 0 (0: only at the end)")


def validate(config: Any, *, num_data_shards: int, workdir: str | None = None,
             available_devices: int | None = None) -> None:
    """Raises ``ConfigError`` for values that cannot work on ``num_data_shards`` devices (of ``available_devices``
    that JAX sees), a ``workdir`` this process cannot use, and missing or unreadable input files."""
    _check_devices(config, available_devices)
    if workdir is not None:
        _check_workdir(workdir)
    _require(config.num_steps > 0, f"num_steps must be positive, got {config.num_steps}")
    for key in ("batch_size", "eval_batch_size"):
        _check_batch(config, key, num_data_shards)
    _check_loop(config)
    _check_model(config.model)
    _check_text_embeddings(config)
    model = config.model
    if model.text.vocab_size <= 0 or model.text.eot_id < 0:  # filled in from the tokenizer later
        model = ml_collections.ConfigDict(model.to_dict())
        model.text.vocab_size, model.text.eot_id = max(model.text.vocab_size, 2), 1
    if model.text.get("kind", "") == "precomputed" and model.text.input_dim < 1:  # lit.embeddings_from fills it
        model = ml_collections.ConfigDict(model.to_dict())
        model.text.input_dim = 1
    try:
        validate_model_config(model)
    except (ValueError, ArithmeticError) as e:
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
    _check_data_path(config)
    weights = config.data.get("color_weights", None) or ()
    _require(not weights or source == "synthetic",
             f"data.color_weights is read by the synthetic source only, not data.source={source!r}")
    _constructed(lambda: synthetic.color_distribution(weights))
    _check_tokenizer(config)
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
    _require(p.subset_groups >= 0, f"psd.subset_groups={p.subset_groups} must be >= 0 (0: the default strata)")
    groups = soft_targets.resolve_groups(p.subset_groups, config.batch_size)  # any mesh: S does not depend on it
    _constructed(lambda: soft_targets.subset_layout(config.batch_size, p.subset_fraction, groups))
    objective = _constructed(lambda: registry.make_objective(
        ObjectiveContext(config, None, config.batch_size, num_data_shards)))
    v = config.model.vision
    _require(v.get("unmask_last_steps", 0) <= config.num_steps,
             f"model.vision.unmask_last_steps={v.get('unmask_last_steps', 0)} exceeds num_steps={config.num_steps}")
    _require(not (v.get("mask_ratio", 0.0) > 0 and v.get("mask", "random") == "attentive") or (
        teacher.provides_attention and p.alpha_max > 0 and p.subset_fraction > 0), teachers.ATTENTIVE_NEEDS)
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
