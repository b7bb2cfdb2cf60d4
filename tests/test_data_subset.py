"""data.train_fraction: a fixed, seeded, nested subset of the train split, re-numbered so batch['index'] indexes it."""

import math

import numpy as np
import pytest

from softalign.config import checks
from softalign.config.schema import base_config
from softalign.data import pipeline, sources, subset
from softalign.data.synthetic import caption_corpus
from softalign.data.tokenizer import Tokenizer


def _cfg(**overrides):
    cfg = pipeline.default_data_config()
    cfg.update(dict(train_size=40, heldout_size=8, num_threads=0, prefetch_buffer_size=1))
    cfg.update(overrides)
    return cfg


def test_subsets_are_seeded_nested_prefixes():
    n = 6091
    small, mid, full = (subset.subset_indices(f, n, seed=3) for f in (0.1, 0.3, 1.0))
    assert len(small) == math.ceil(0.1 * n) and len(mid) == math.ceil(0.3 * n) and len(full) == n
    assert np.array_equal(mid[:len(small)], small) and np.array_equal(full[:len(mid)], mid)
    assert sorted(full.tolist()) == list(range(n))
    assert np.array_equal(small, subset.subset_indices(0.1, n, seed=3))
    assert not np.array_equal(small, subset.subset_indices(0.1, n, seed=4))
    assert subset.subset_size(0.3, 10) == 3 and subset.subset_size(1e-6, 10) == 1  # no float round-up; never empty
    with pytest.raises(ValueError, match=r"train_fraction must be in \(0, 1\]"):
        subset.subset_size(0.0, 10)


def test_subset_source_renumbers_and_keeps_noisy_captions():
    full = sources.build_source(_cfg(caption_noise=0.5), "train")
    cut = sources.build_source(_cfg(caption_noise=0.5, train_fraction=0.25), "train")
    assert isinstance(cut, subset.TrainSubset) and len(cut) == 10 and cut.full_size == 40
    for k in range(len(cut)):
        record, original = cut[k], full[cut.original_index(k)]
        assert record["index"] == k
        assert record["caption"] == original["caption"]   # the noise was drawn over the whole split
        np.testing.assert_array_equal(record["image"], original["image"])
    assert not isinstance(sources.build_source(_cfg(), "train"), subset.TrainSubset)  # f = 1: the split itself
    assert not isinstance(sources.build_source(_cfg(train_fraction=0.25), "heldout"), subset.TrainSubset)
    with pytest.raises(ValueError, match=r"train_fraction must be in \(0, 1\], got 0.0"):
        sources.build_source(_cfg(train_fraction=0.0), "train")


def test_pipeline_trains_on_the_subset_only():
    tok = Tokenizer.train_bpe(caption_corpus(500, seed=0), vocab_size=300, context_length=40)
    cfg = _cfg(train_fraction=0.25, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    cut = sources.build_source(cfg, "train")
    it = pipeline.make_train_iterator(cfg, tok, global_batch_size=5, seed=0)
    seen = []
    for _ in range(4):   # two epochs of the 10-record subset
        batch = next(it)
        seen.extend(batch["index"].tolist())
        expected = pipeline.normalize_images(np.stack([cut[int(i)]["image"] for i in batch["index"]]))
        np.testing.assert_allclose(batch["image"], expected, atol=1e-5)
    assert sorted(seen) == sorted(list(range(10)) * 2)
    with pytest.raises(ValueError, match=r"2 records \(data.train_fraction=0.05\) < global batch 5"):
        pipeline.make_train_iterator(_cfg(train_fraction=0.05), tok, global_batch_size=5, seed=0)


@pytest.mark.parametrize("fraction,message", [
    (0.0, "data.train_fraction=0.0 must be in (0, 1]"),
    (1.5, "data.train_fraction=1.5 must be in (0, 1]"),
    (0.01, "data.train_size=400 x data.train_fraction=0.01 = 4 records is smaller than one global batch (16)"),
])
def test_config_check(fraction, message):
    c = base_config()
    c.data.train_size, c.batch_size, c.data.train_fraction = 400, 16, fraction
    with pytest.raises(checks.ConfigError) as err:
        checks.validate(c, num_data_shards=1)
    assert message in str(err.value)
