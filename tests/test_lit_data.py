"""lit_demo's pieces on a tiny model: the teacher-embedded ArrayRecord dataset (random embeddings standing in for a
text tower), its reuse, the config it yields, the embedding_retrieval evaluator, and a short run on it."""

import json
import os
import zlib

import jax
import numpy as np
import pytest
from tiny import tiny_config

from softalign.config import checks
from softalign.config.errors import ConfigError
from softalign.data import decode, pipeline
from softalign.data.sources import build_source
from softalign.data.tokenizer import synthetic_tokenizer
from softalign.evaluation import suite
from softalign.training import lit

D = 10


def fake_encoder(captions):
    """A deterministic stand-in for a text tower: a seeded random vector per distinct caption."""
    out = np.stack([np.random.default_rng(zlib.crc32(c.encode())).normal(size=D) for c in captions])
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def lit_config(tmp_path, **overrides):
    c = tiny_config(**{"data.train_size": 64, "data.heldout_size": 32, "lit.embeddings_from": str(tmp_path / "t"),
                       "lit.data_dir": str(tmp_path / "lit"), "model.text.kind": "precomputed",
                       "model.text.projector_hidden": 16, "psd.alpha_max": 0.0, "psd.teacher": "self",
                       "evals": {"heldout": {"kind": "embedding_retrieval", "split": "heldout"}}, **overrides})
    return c


def test_build_dataset_writes_embeddings_aligned_with_captions(tmp_path):
    c = lit_config(tmp_path)
    info = lit.build_dataset(c, str(tmp_path / "lit"), fake_encoder)
    assert info["splits"]["train"]["records"] == 64 and info["splits"]["val"]["records"] == 32
    synthetic = build_source(c.data, "heldout")
    data = c.data.to_dict()
    data.update(source="arrayrecord", path=str(tmp_path / "lit"), heldout_split="val", text_embedding_shape=(1, D))
    source = build_source(data, "heldout")
    for i in (0, 7, 31):
        record = source[i]
        assert record["captions"] == synthetic.captions_of(i)
        got = decode.prepare(record, text_embedding_shape=(1, D))["text_embedding"]
        np.testing.assert_allclose(got[0], fake_encoder(synthetic.captions_of(i))[0], atol=1e-3)  # float16


def test_prepare_reuses_a_matching_dataset_and_fills_the_config(tmp_path, monkeypatch):
    calls = []

    def encoder(teacher_dir):
        calls.append(teacher_dir)
        return fake_encoder, D

    monkeypatch.setattr(lit, "text_encoder", encoder)
    c = lit_config(tmp_path)
    checks.validate(c, num_data_shards=1)  # input_dim 0 and no text_embedding_shape: lit fills them in
    prepared = lit.prepare(c, str(tmp_path / "run"))
    assert prepared.data.source == "arrayrecord" and tuple(prepared.data.text_embedding_shape) == (1, D)
    assert prepared.model.text.input_dim == D
    assert prepared.tokenizer.path == os.path.join(str(tmp_path / "t"), "tokenizer.json")
    info = json.loads((tmp_path / "lit" / lit.INFO_FILE).read_text())
    assert info["lit"]["train_size"] == 64 and info["embed_dim"] == D
    lit.prepare(c, str(tmp_path / "run"))
    assert len(calls) == 1                                                # the second call reused the dataset
    assert lit.prepare(prepared, str(tmp_path / "run")) is prepared       # already prepared: unchanged
    c.data.train_size = 48
    lit.prepare(c, str(tmp_path / "run"))
    assert len(calls) == 2                                                # other sizes: rebuilt


def test_lit_refuses_a_missing_teacher_and_other_sources(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        lit.text_encoder(str(tmp_path))
    c = lit_config(tmp_path, **{"data.source": "arrayrecord", "data.path": str(tmp_path)})
    with pytest.raises(ConfigError, match="synthetic"):
        lit.prepare(c, str(tmp_path / "run"))


def test_embedding_retrieval_on_the_texts_own_embeddings(tmp_path):
    c = lit_config(tmp_path)
    lit.build_dataset(c, str(tmp_path / "lit"), fake_encoder)
    c.data.update(source="arrayrecord", path=str(tmp_path / "lit"), heldout_split="val", text_embedding_shape=(1, D))
    tokenizer = synthetic_tokenizer(24, vocab_size=300, num_captions=500)
    evaluator, = suite.build_evaluators(c, tokenizer)
    assert evaluator.chance["i2t_R@5"] == pytest.approx(5 / 32)
    arrays = pipeline.make_eval_arrays(build_source(c.data, "heldout"), tokenizer, 8, text_embedding_shape=(1, D))
    # an image encoder that "knows" each image's own caption embedding: perfect retrieval
    lookup = {arrays["image"][i].tobytes(): arrays["text_embedding"][i, 0] for i in range(32)}
    encode_image = lambda x: np.stack([lookup.get(np.asarray(r).tobytes(), np.zeros(D, np.float32)) for r in x])
    metrics = evaluator.run(encode_image, lambda t: np.asarray(t))
    assert metrics["i2t_R@1"] >= 0.9 and metrics["t2i_R@1"] >= 0.9


def test_a_short_lit_run_on_the_dataset(tmp_path, monkeypatch):
    """The whole loop on a tiny model: prepare -> train on the ArrayRecord path -> embedding_retrieval results."""
    from softalign.training import train

    monkeypatch.setattr(lit, "text_encoder", lambda teacher_dir: (fake_encoder, D))
    teacher = tmp_path / "t"
    teacher.mkdir()
    synthetic_tokenizer(24, vocab_size=300, num_captions=500).save(str(teacher / "tokenizer.json"))
    c = lit_config(tmp_path, **{"num_steps": 4, "checkpoint_every": 4, "num_devices": 2})
    results = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert set(results["heldout"]) >= {"i2t_R@5", "t2i_R@5"}
    assert all(np.isfinite(v) for v in results["heldout"].values())
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["text"]["input_dim"] == D and saved["data"]["source"] == "arrayrecord"
    import softalign
    from softalign.cli import evaluate

    payload = evaluate.evaluate_checkpoint(evaluate.run_config(str(tmp_path / "run")), str(tmp_path / "run"))
    assert set(payload["results"]) == {"heldout"}                          # the run's own evals, text-free
    assert payload["results"]["heldout"]["i2t_R@5"] == pytest.approx(results["heldout"]["i2t_R@5"])
    model = softalign.load(str(tmp_path / "run"))
    with pytest.raises(ValueError, match="precomputed"):
        model.encode_text(["a red circle"])
    with pytest.raises(ValueError, match="precomputed"):
        model.zero_shot_classifier(["red", "blue"])
    out = model.encode_text_embedding(np.ones((3, 2, D), np.float32))
    assert out.shape == (6, model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    jax.clear_caches()


def test_k2_facets_through_the_arrayrecord_path_and_the_loop(tmp_path):
    """Converter (N, 2, D) table -> ArrayRecord -> pipeline -> train step with multi_positive_sigmoid (K = 2 reached
    the objective: done.json's train/facets) -> embedding_retrieval with 2 captions per image."""
    from softalign.data import convert
    from softalign.evaluation.retrieval import retrieval_chance
    from softalign.training import train

    c = tiny_config(**{"data.train_size": 64, "data.heldout_size": 32})
    out = tmp_path / "data"
    out.mkdir()
    rng = np.random.default_rng(0)
    for split, name in lit.SPLITS:
        source = build_source(c.data, split)
        convert.convert_split(source, str(out), name, num_threads=1, show_progress=False,
                              text_embeddings=rng.normal(size=(len(source), 2, D)).astype(np.float32))
    c = tiny_config(**{"data.source": "arrayrecord", "data.path": str(out), "data.text_embedding_shape": (2, D),
                       "model.text.kind": "precomputed", "model.text.input_dim": D, "model.text.projector_hidden": 8,
                       "objective.name": "multi_positive_sigmoid", "model.logit_scale_init": 10.0,
                       "psd.alpha_max": 0.0, "psd.teacher": "self", "num_steps": 4, "checkpoint_every": 4,
                       "num_devices": 4, "evals": {"heldout": {"kind": "embedding_retrieval"}}})
    results = train.train_and_evaluate(c, str(tmp_path / "run"))
    done = json.loads((tmp_path / "run" / "done.json").read_text())
    assert done["train"]["train/facets"] == 2.0 and np.isfinite(done["train"]["train/loss"])
    assert np.isfinite(results["heldout"]["i2t_R@5"])
    evaluator, = suite.build_evaluators(c, synthetic_tokenizer(24, vocab_size=300, num_captions=200))
    assert evaluator.chance["i2t_R@5"] == pytest.approx(retrieval_chance(32, 64, 2, 5)["i2t_R@5"])
    jax.clear_caches()
