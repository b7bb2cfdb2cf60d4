"""LiT from a finished run (``lit.embeddings_from=WORKDIR``): that run's frozen text tower embeds the synthetic
source's captions, and the records are written with them as ArrayRecord shards (``text_embedding``, K = 1) through
the real converter, so the new run trains on the ArrayRecord path like any converted dataset.

The dataset goes to ``lit.data_dir`` (default ``<workdir>/lit_data``) with a ``dataset_info.json`` naming the run
and the sizes it was made from; a later call with the same ones (a resumed run) reuses it. `prepare` returns the
config pointed at it: data.source='arrayrecord', data.path, data.text_embedding_shape=(1, D), model.text.input_dim=D
and, unless one is set, the teacher's tokenizer (the student's captions are never tokenized by a text tower).
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
from softalign.config.schema import base_config
from softalign.data import arrayrecord, convert
from softalign.data.sources import build_source
from softalign.evaluation.embedding import embed_in_batches
from softalign.training import checkpointing, setup

SPLITS = (("train", "train"), ("heldout", "val"))  # (pipeline split, shard name)
INFO_FILE = "dataset_info.json"


def text_encoder(teacher_dir: str) -> tuple[Any, int]:
    """``(captions -> float32 (n, D) embeddings, D)`` of the text tower of the finished run in `teacher_dir`."""
    saved = os.path.join(teacher_dir, run_files.CONFIG_FILE)
    if not os.path.exists(saved):
        raise ConfigError(f"lit.embeddings_from={teacher_dir}: {saved} is missing (not a finished training run)")
    with open(saved, encoding="utf-8") as f:
        config = base_config()
        config.update(json.load(f))
    loaded = setup.load_model(config, teacher_dir)
    params, _, _ = checkpointing.restore_params(teacher_dir, loaded.abstract_params)
    encode_text = setup.encoders(loaded.model)[1]

    def encode(captions: list[str]) -> np.ndarray:
        tokens = loaded.tokenizer.encode_batch(captions)
        return embed_in_batches(lambda t: encode_text(params, t), tokens, 256, jit=False)

    return encode, int(loaded.config.model.embed_dim)


def _wanted(config: Any, teacher_dir: str) -> dict[str, Any]:
    d = config.data
    return {"embeddings_from": os.path.abspath(teacher_dir), "seed": int(d.seed), "image_size": int(d.image_size),
            "train_size": int(d.train_size), "heldout_size": int(d.heldout_size), "max_objects": int(d.max_objects)}


def build_dataset(config: Any, output_dir: str, encode: Any) -> dict[str, Any]:
    """Writes the synthetic source's train and held-out splits with `encode`'s caption embeddings (float16, K = 1)
    to `output_dir`; returns the dataset_info written."""
    os.makedirs(output_dir, exist_ok=True)
    info: dict[str, Any] = {"format": "softalign-arrayrecord", "version": arrayrecord.FORMAT_VERSION, "splits": {}}
    for split, name in SPLITS:
        source = build_source(config.data, split)
        captions = [source.captions_of(i)[0] for i in range(len(source))]
        embeddings = np.asarray(encode(captions), np.float16)[:, None, :]   # (n, 1, D): one facet per record
        for old in os.listdir(output_dir):
            if old.startswith(f"{name}-") and old.endswith(arrayrecord.EXTENSION):
                os.remove(os.path.join(output_dir, old))
        info["splits"][name] = convert.convert_split(source, output_dir, name, num_threads=2,
                                                     show_progress=False, text_embeddings=embeddings)
        print(convert.summary_line(name, info["splits"][name], output_dir), flush=True)
    return info


def prepare(config: Any, workdir: str) -> Any:
    """`config` as is without lit.embeddings_from; else the dataset built (or reused) and the config pointed at it."""
    teacher_dir = str(config.get("lit", {}).get("embeddings_from", "") or "")
    if not teacher_dir or (config.data.source == "arrayrecord" and config.data.get("text_embedding_shape")):
        return config   # no LiT, or a config prepared before (e.g. a run's config.json)
    if config.data.source != "synthetic":
        raise ConfigError(f"lit.embeddings_from embeds the synthetic source's captions, not data.source="
                          f"{config.data.source!r}")
    if jax.process_count() > 1:
        raise ConfigError("lit.embeddings_from builds its dataset in one process: run it once single-process")
    output_dir = config.lit.data_dir or os.path.join(workdir, "lit_data")
    info_path, wanted = os.path.join(output_dir, INFO_FILE), _wanted(config, teacher_dir)
    info = None
    if os.path.exists(info_path):
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    if info is None or info.get("lit") != wanted:
        encode, dim = text_encoder(teacher_dir)
        info = build_dataset(config, output_dir, encode)
        info["lit"], info["embed_dim"] = wanted, dim
        run_files.write_json_atomic(info_path, info)
    else:
        logging.info("lit: reusing the dataset in %s", output_dir)
    config = ml_collections.ConfigDict(config.to_dict())
    dim = int(info["embed_dim"])
    config.data.update(source="arrayrecord", path=output_dir, train_split="train", heldout_split="val",
                       text_embedding_shape=(1, dim))
    config.model.text.input_dim = dim
    if not config.tokenizer.path:
        config.tokenizer.path = os.path.join(teacher_dir, run_files.TOKENIZER_FILE)
    return config
