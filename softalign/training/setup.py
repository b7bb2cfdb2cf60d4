"""What every entry point builds from a config before it can run a model: the device count and mesh, the
tokenizer (and the model config it completes), the model and its abstract params.

Training, standalone evaluation and weight export all go through these functions, so a run's model is rebuilt
the same way wherever it is read.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath
from jax.sharding import Mesh

from softalign import workdir as run_files
from softalign.config import checks
from softalign.config.errors import ConfigError
from softalign.data.sources import sample_captions
from softalign.data.tokenizer import Tokenizer, corpus_tokenizer, synthetic_tokenizer
from softalign.models import CLIP, abstract_params, build_model
from softalign.parallel import sharding
from softalign.training import external_teacher


def device_count(config: Any) -> int:
    """The number of devices the run uses: ``num_devices``, or all of them when it is <= 0."""
    return jax.device_count() if config.num_devices <= 0 else config.num_devices


def load_tokenizer(config: Any, workdir: str) -> Tokenizer:
    """The configured tokenizer.json, else the one this run trained before, else a new BPE on the source's
    captions (saved in the workdir, so a resumed run uses the same vocabulary)."""
    length = config.model.text.context_length
    if config.tokenizer.path:
        return Tokenizer.from_file(config.tokenizer.path, length)
    path = epath.Path(workdir) / run_files.TOKENIZER_FILE
    if path.exists():
        with tempfile.TemporaryDirectory() as tmp:  # the workdir may be remote (gs://); tokenizers reads local files
            local = os.path.join(tmp, run_files.TOKENIZER_FILE)
            epath.Path(local).write_bytes(path.read_bytes())
            return Tokenizer.from_file(local, length)
    logging.info("Building the tokenizer (no tokenizer.json in the workdir yet; vocab %d, %s captions)",
                 config.tokenizer.vocab_size, config.data.source)
    lent = external_teacher.teacher_tokenizer_file(config)  # distill: the teacher's vocabulary, copied here
    if lent is not None:
        tok = Tokenizer.from_file(lent, length)
    elif config.data.source != "synthetic":
        tok = corpus_tokenizer(sample_captions(config.data, config.tokenizer.num_captions), length,
                               vocab_size=config.tokenizer.vocab_size)
    else:
        tok = synthetic_tokenizer(length, vocab_size=config.tokenizer.vocab_size,
                                  num_captions=config.tokenizer.num_captions, seed=config.data.seed)
    if jax.process_index() == 0:
        with tempfile.TemporaryDirectory() as tmp:
            tok.save(os.path.join(tmp, run_files.TOKENIZER_FILE))
            staged = path.parent / (run_files.TOKENIZER_FILE + ".tmp")
            staged.write_bytes(epath.Path(tmp, run_files.TOKENIZER_FILE).read_bytes())
            staged.rename(path)  # other processes and restarts never read a partial file
    logging.info("Trained a BPE tokenizer (vocab %d) on %s captions -> %s", tok.vocab_size, config.data.source, path)
    return tok


def resolve_config(config: Any, tokenizer: Tokenizer) -> ml_collections.ConfigDict:
    """A copy of ``config`` with the text tower's vocabulary and end-of-text id taken from the tokenizer."""
    config = ml_collections.ConfigDict(config.to_dict())
    text = config.model.text
    if text.vocab_size <= 0:
        text.vocab_size = tokenizer.vocab_size
    elif tokenizer.vocab_size > text.vocab_size:
        raise ConfigError(
            f"model.text.vocab_size={text.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}")
    if text.eot_id < 0:
        text.eot_id = tokenizer.eot_id
    elif text.eot_id != tokenizer.eot_id:  # the text tower pools at eot_id: it must be the tokenizer's
        raise ConfigError(
            f"model.text.eot_id={text.eot_id} but the tokenizer's end-of-text id is {tokenizer.eot_id} "
            "(set it to -1 to take it from the tokenizer)")
    return config


@dataclasses.dataclass
class ModelSetup:
    """A run's model as evaluation and export rebuild it: no optimizer, no teacher, params not yet read."""

    config: ml_collections.ConfigDict  # resolved: vocab_size and eot_id filled in
    tokenizer: Tokenizer
    model: CLIP
    mesh: Mesh
    abstract_params: Any  # ShapeDtypeStructs, replicated over ``mesh``


class MissingTokenizerError(FileNotFoundError):
    """A workdir without the tokenizer its run trained, and no ``tokenizer.path``."""


def load_model(config: Any, workdir: str) -> ModelSetup:
    """The model of the training run in ``workdir`` (its tokenizer, resolved config, mesh and params' shapes)."""
    if not config.tokenizer.path and not os.path.exists(os.path.join(workdir, run_files.TOKENIZER_FILE)):
        raise MissingTokenizerError(
            f"no tokenizer: {os.path.join(workdir, run_files.TOKENIZER_FILE)} is missing and config.tokenizer.path "
            "is empty (is --workdir a training run's directory?)")
    tokenizer = load_tokenizer(config, workdir)
    config = resolve_config(config, tokenizer)
    num_devices = device_count(config)
    checks.validate_eval(config, num_devices=num_devices, available_devices=jax.device_count())
    mesh = sharding.make_mesh(num_devices)
    replicated = sharding.replicated(mesh)
    shapes = abstract_params(config.model)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), shapes)
    return ModelSetup(config, tokenizer, build_model(config.model), mesh, abstract)


def encoders(model: CLIP) -> tuple[Any, Any]:
    """Jitted ``(params, images) -> image embeddings`` and ``(params, tokens) -> text embeddings``."""
    encode = lambda method: jax.jit(lambda p, x: model.apply({"params": p}, x, method=method))
    return encode(CLIP.encode_image), encode(CLIP.encode_text)
