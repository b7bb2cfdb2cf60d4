"""Integration on the shared real data (skipped when ../shared/data is absent): CIFAR-10 test as zero-shot and
Flickr8k val as retrieval, each on a small subset, with a randomly initialised tiny CLIP."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("SOFTALIGN_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))
CIFAR10 = os.path.join(SHARED, "cifar10", "test")
FLICKR8K = os.path.join(SHARED, "flickr8k")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from tiny import tiny_config

    from softalign.training import train

    config = tiny_config(num_devices=1)
    run = train.build_run(config, str(tmp_path_factory.mktemp("shared") / "w"))
    encoders = (functools.partial(run.encode_image, run.state.params),
                functools.partial(run.encode_text, run.state.params))
    return run, encoders


@pytest.mark.skipif(not os.path.isdir(CIFAR10), reason=f"shared CIFAR-10 test folder not found at {CIFAR10}")
def test_cifar10_zero_shot_subset(tiny_run):
    from softalign.evaluation import suite

    run, (enc_img, enc_txt) = tiny_run
    evals = {"cifar10": dict(kind="zeroshot", dataset=dict(type="folder", path=CIFAR10, max_examples=400))}
    (ev,) = suite.build_evaluators(run.config, run.tokenizer, evals=evals)
    assert ev.num_images == 400 and ev.chance["top1"] == pytest.approx(0.1)
    metrics = ev.run(enc_img, enc_txt)
    assert set(metrics) == {"top1", "top5", "mean_per_class_recall"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values()) and metrics["top5"] >= metrics["top1"]

    from softalign.evaluation.datasets import ImageContext, load_classification
    data = load_classification(dict(type="folder", path=CIFAR10, max_examples=400), ImageContext(8))
    assert data.classnames == CIFAR10_CLASSES and data.templates_key == "cifar10"
    assert len(np.unique(data.labels)) == 10  # the random subset covers every class


@pytest.mark.skipif(not os.path.isfile(os.path.join(FLICKR8K, "splits.json")),
                    reason=f"shared Flickr8k (images/, captions.txt, splits.json) not found at {FLICKR8K}")
def test_flickr8k_val_retrieval_subset(tiny_run):
    from softalign.evaluation import suite

    run, (enc_img, enc_txt) = tiny_run
    spec = dict(type="captions", path=FLICKR8K, split="val", max_examples=150)
    (ev,) = suite.build_evaluators(run.config, run.tokenizer, evals={"flickr": dict(kind="retrieval",
                                                                                     dataset=spec)})
    assert ev.num_images == 150
    assert ev.chance["t2i_R@1"] == pytest.approx(1 / 150)
    metrics = ev.run(enc_img, enc_txt)
    for k in (1, 5, 10):
        assert 0.0 <= metrics[f"i2t_R@{k}"] <= 1.0 and 0.0 <= metrics[f"t2i_R@{k}"] <= 1.0
    assert 1 <= metrics["t2i_mean_rank"] <= 150 and 1 <= metrics["i2t_mean_rank"] <= 5 * 150

    from softalign.evaluation.datasets import ImageContext, load_captions
    data = load_captions(spec, ImageContext(8))
    assert len(data.captions) == 5 * 150 and np.bincount(data.text_to_image).tolist() == [5] * 150
