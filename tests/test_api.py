"""softalign.load: a workdir (config.json + tokenizer + params) or weight files, embeddings with preprocessing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from trained_run import ROOT, train_tiny

import softalign
from softalign.evaluation.zeroshot import build_classifier
from softalign.interop import weight_files, weights


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(str(tmp_path_factory.mktemp("api") / "w"))


@pytest.fixture(scope="module")
def model(run):
    return softalign.load(run)


def _images(n=5, size=11, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_training_writes_the_resolved_config(run):
    saved = json.load(open(os.path.join(run, "config.json")))
    assert saved["model"]["text"]["vocab_size"] > 0 and saved["model"]["text"]["eot_id"] >= 0
    assert saved["model"]["embed_dim"] == 16 and saved["num_steps"] == 4


def test_import_is_light_and_load_is_lazy():
    code = "import sys, softalign; assert 'jax' not in sys.modules; softalign.load; assert 'jax' in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_embeddings_match_the_training_encoders(run, model):
    from softalign.training import checkpointing, setup

    assert model.step == 4 and model.embed_dim == 16 and model.image_size == 8
    loaded = setup.load_model(model.config, run)
    params, _, _ = checkpointing.restore_params(run, loaded.abstract_params)
    enc_img, enc_txt = setup.encoders(loaded.model)
    texts = ["a red circle", "two shapes: a blue square and a small ring", "a green cross"]
    np.testing.assert_allclose(model.encode_text(texts), np.asarray(enc_txt(params, model.tokenizer.encode_batch(
        texts))), atol=1e-6)
    images = _images(4, size=8)
    expected = np.asarray(enc_img(params, (images / 255.0 - np.array(model.mean)) / np.array(model.std)))
    np.testing.assert_allclose(model.encode_image(images), expected, atol=1e-5)
    emb = model.encode_text("a red circle")
    assert emb.shape == (1, 16) and abs(np.linalg.norm(emb) - 1) < 1e-5


def test_every_image_form_gives_the_same_embedding(model):
    raw = _images(3, size=11)
    pils = [Image.fromarray(x) for x in raw]
    reference = model.encode_image(raw)
    np.testing.assert_allclose(model.encode_image(pils), reference, atol=1e-6)
    np.testing.assert_allclose(model.encode_image(list(raw)), reference, atol=1e-6)
    batch = np.stack([model.preprocess(p) for p in pils])
    assert batch.shape == (3, 8, 8, 3) and batch.dtype == np.float32
    np.testing.assert_allclose(model.encode_image(batch, preprocessed=True), reference, atol=1e-6)
    np.testing.assert_allclose(model.encode_image(raw[0]), reference[:1], atol=1e-6)
    small = _images(2, size=8)
    np.testing.assert_allclose(model.encode_image(small / 255.0), model.encode_image(small), atol=1e-5)
    with pytest.raises(ValueError, match="preprocessed=True"):
        model.encode_image(batch)   # normalised floats are not pixels: no silent double normalisation
    assert model.encode_image(np.zeros((0, 8, 8, 3), np.uint8)).shape == (0, 16)


def test_zero_shot_classifier(model):
    names, templates = ["red", "blue", "green"], ["a {} shape", "a {} object"]
    weights_ = model.zero_shot_classifier(names, templates)
    assert weights_.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(weights_, axis=1), 1.0, atol=1e-5)
    encode = lambda tokens: model._embed(model._encode_text, tokens)
    np.testing.assert_allclose(weights_, build_classifier(encode, model.tokenizer, names, templates), atol=1e-6)
    mean = np.stack([model.encode_text([t.format(n) for t in templates]).mean(0) for n in names])
    expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    np.testing.assert_allclose(weights_, expected, atol=1e-6)


def test_step_and_errors(run, model, tmp_path):
    early = softalign.load(run, step=2)
    assert early.step == 2
    assert not np.allclose(early.encode_text("a red circle"), model.encode_text("a red circle"))
    with pytest.raises(FileNotFoundError, match="neither a training run's workdir nor a weight file"):
        softalign.load(str(tmp_path / "nothing"))
    empty = tmp_path / "old_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        softalign.load(str(empty))


@pytest.mark.parametrize("suffix", [".safetensors", ".msgpack"])
def test_weight_files_load_like_the_run(run, model, tmp_path, suffix):
    path = str(tmp_path / f"model{suffix}")
    if suffix == ".msgpack":
        weight_files.save_params(model.params, path)
    else:
        weight_files.save_state_dict(weights.params_to_state_dict(model.params), path)
    tokenizer = os.path.join(run, "tokenizer.json")
    same = softalign.load(path, config=model.config, tokenizer=tokenizer)
    texts, images = ["a red circle", "a big blue ring"], _images(3)
    np.testing.assert_array_equal(same.encode_text(texts), model.encode_text(texts))
    np.testing.assert_array_equal(same.encode_image(images), model.encode_image(images))
    inferred = softalign.load(path, tokenizer=tokenizer)   # architecture from the shapes (64-wide heads assumed)
    assert inferred.image_size == 8 and inferred.embed_dim == 16
    assert inferred.config.model.vision.patch_size == 4 and inferred.config.model.text.depth == 1
    assert inferred.encode_text(texts).shape == (2, 16)
