"""Tests for the Grain train pipeline, eval arrays, source registry and global-batch assembly."""

import itertools

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from softalign.data import pipeline, registry, sources
from softalign.data.synthetic import SyntheticScenes, caption_corpus
from softalign.data.tokenizer import Tokenizer

L = 40


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_bpe(caption_corpus(1000, seed=0), vocab_size=400, context_length=L)


def _cfg(**overrides):
    cfg = pipeline.default_data_config()
    cfg.update(dict(train_size=40, heldout_size=32, num_threads=2, prefetch_buffer_size=2))
    cfg.update(overrides)
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in ("image", "tokens", "index"))


def test_batch_shapes_and_dtypes(tok):
    batch = next(pipeline.make_train_iterator(_cfg(), tok, global_batch_size=8, seed=0))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["tokens"].shape == (8, L) and batch["tokens"].dtype == np.int32
    assert batch["index"].shape == (8,) and batch["index"].dtype == np.int64
    assert np.all(batch["tokens"][:, 0] == tok.sot_id)
    assert -2.5 < batch["image"].min() and batch["image"].max() < 2.5


def test_identity_crop_matches_source(tok):
    cfg = _cfg(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), caption_noise=0.25)
    batch = next(pipeline.make_train_iterator(cfg, tok, global_batch_size=8, seed=1))
    src = sources.build_source(cfg, "train")
    recs = [src[int(i)] for i in batch["index"]]
    expected = pipeline.normalize_images(np.stack([r["image"] for r in recs]))
    np.testing.assert_allclose(batch["image"], expected, atol=1e-5)
    assert np.array_equal(batch["tokens"], tok.encode_batch([r["caption"] for r in recs]))


def test_same_seed_same_batches_and_epochs(tok):
    a = _take(pipeline.make_train_iterator(_cfg(), tok, global_batch_size=8, seed=3), 10)
    b = _take(pipeline.make_train_iterator(_cfg(), tok, global_batch_size=8, seed=3), 10)
    c = _take(pipeline.make_train_iterator(_cfg(), tok, global_batch_size=8, seed=4), 10)
    assert _equal(a, b) and not _equal(a, c)
    epoch0 = np.concatenate([x["index"] for x in a[:5]])
    epoch1 = np.concatenate([x["index"] for x in a[5:]])
    assert sorted(epoch0) == list(range(40)) == sorted(epoch1)   # each epoch is a permutation
    assert not np.array_equal(epoch0, epoch1)                        # reshuffled each epoch


@pytest.mark.parametrize("k", [2, 7])
def test_resume_from_state_equals_uninterrupted(tok, k):
    # 40 records, batch 16: epoch boundaries fall inside batches 2, 5, 7, ...
    reference = _take(pipeline.make_train_iterator(_cfg(), tok, global_batch_size=16, seed=5), k + 5)
    it = pipeline.make_train_iterator(_cfg(), tok, global_batch_size=16, seed=5)
    _take(it, k)
    state = it.get_state()
    _take(it, 3)   # the state must not depend on what happened afterwards
    resumed = pipeline.make_train_iterator(_cfg(), tok, global_batch_size=16, seed=5)
    resumed.set_state(state)
    assert _equal(_take(resumed, 5), reference[k:])


def test_process_sharding_is_disjoint_and_covers_global_batch(tok):
    cfg = _cfg(train_size=64)
    full = _take(pipeline.make_train_iterator(cfg, tok, global_batch_size=16, seed=2), 6)
    local = [_take(pipeline.make_train_iterator(cfg, tok, global_batch_size=16, seed=2,
                                                process_index=p, process_count=2), 6) for p in (0, 1)]
    for step in range(6):
        idx0, idx1 = local[0][step]["index"], local[1][step]["index"]
        assert len(idx0) == 8 and not set(idx0.tolist()) & set(idx1.tolist())
        for key in ("image", "tokens", "index"):   # process p holds rows [p*b, (p+1)*b) of the global batch
            stacked = np.concatenate([local[0][step][key], local[1][step][key]])
            assert np.array_equal(stacked, full[step][key])
    with pytest.raises(ValueError, match="divisible"):
        pipeline.make_train_iterator(cfg, tok, global_batch_size=15, seed=0, process_count=2)


def test_eval_arrays(tok):
    cfg = _cfg()
    ev = pipeline.make_eval_split(cfg, tok)
    assert ev["image"].shape == (32, 32, 32, 3) and ev["tokens"].shape == (32, L)
    assert np.array_equal(ev["index"], np.arange(32))
    assert set(ev["labels"]) == {"color", "shape", "size", "position", "num_objects"}
    held = SyntheticScenes("heldout", 32)
    assert ev["caption"][3] == held[3]["caption"]
    np.testing.assert_allclose(ev["image"][3], pipeline.normalize_images(held[3]["image"]), atol=1e-6)
    big = pipeline.make_eval_arrays(SyntheticScenes("heldout", 4, image_size=64), tok, 32)
    assert big["image"].shape == (4, 32, 32, 3)


def test_source_registry():
    assert {"synthetic", "arrayrecord", "webdataset", "folder", "tfds"} <= set(sources.available_sources())
    with pytest.raises(ValueError, match="synthetic"):
        sources.build_source(_cfg(source="no_such_source"), "train")
    name = "test_only_source"
    try:
        registry.register_source(name)(lambda cfg, split: SyntheticScenes(split, 3))
        assert len(sources.build_source(_cfg(source=name), "heldout")) == 3
    finally:
        registry._BUILDERS.pop(name, None)
    heldout = sources.build_source(_cfg(caption_noise=0.5), "heldout")
    assert heldout.caption_noise == 0.0 and len(heldout) == 32   # eval captions stay clean


def test_to_global_batch(tok):
    batch = next(pipeline.make_train_iterator(_cfg(), tok, global_batch_size=8, seed=0))
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    out = pipeline.to_global_batch(batch, NamedSharding(mesh, PartitionSpec("data")))
    for key, value in batch.items():
        assert isinstance(out[key], jax.Array) and out[key].shape == value.shape
        np.testing.assert_array_equal(np.asarray(out[key]), value)


def test_iterator_is_long_running(tok):
    it = pipeline.make_train_iterator(_cfg(train_size=16), tok, global_batch_size=16, seed=0)
    for batch in itertools.islice(it, 12):
        assert sorted(batch["index"].tolist()) == list(range(16))
