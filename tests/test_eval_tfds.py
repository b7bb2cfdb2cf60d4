"""TFDS datasets through ``tfds.data_source`` under ``tfds.testing.mock_data`` (no TensorFlow, no download).

mock_data's ``tfds.data_source`` path serves examples from a random generator behind the real builder's
FeaturesDict, so class names come from the builder's ClassLabel metadata exactly as with prepared data. TFDS's
image *encoding* needs TensorFlow, so these tests use the default decoded-array path (which is also what
softalign reads); builders whose module imports TensorFlow (e.g. coco_captions) are covered by two small builders
defined here with the same feature layout.
"""

from __future__ import annotations

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets is not installed")

from softalign.data.pipeline import CLIP_MEAN, CLIP_STD  # noqa: E402
from softalign.evaluation import datasets, suite  # noqa: E402

CTX = datasets.ImageContext(8, CLIP_MEAN, CLIP_STD)


class SoftalignTinyPets(tfds.core.GeneratorBasedBuilder):
    """Labelled images with readable and underscored class names (registered as 'softalign_tiny_pets')."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(20, 30, 3)),
            "species": tfds.features.ClassLabel(names=["cat", "dog"]),
            "label": tfds.features.ClassLabel(names=["red_fox", "tabby cat", "border_collie"]),
        }))

    def _split_generators(self, dl_manager):
        return {}

    def _generate_examples(self):
        yield from ()


class SoftalignTinyCaptions(tfds.core.GeneratorBasedBuilder):
    """COCO-captions-like layout: image + Sequence({'text', 'id'}) (registered as 'softalign_tiny_captions')."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "captions": tfds.features.Sequence({"text": tfds.features.Text(), "id": np.int64}),
        }))

    def _split_generators(self, dl_manager):
        return {}

    def _generate_examples(self):
        yield from ()


@pytest.mark.parametrize("cache_mb", [None, 0])  # decoded once into the cache / read again on each pass
def test_cifar10_by_name(cache_mb):
    with tfds.testing.mock_data(num_examples=10):
        data = datasets.load_classification(dict(type="tfds", name="cifar10", split="test", cache_mb=cache_mb), CTX)
        assert data.name == "cifar10" and data.templates_key == "cifar10"
        assert len(data.classnames) == 10  # from the builder's ClassLabel (num_classes=10)
        assert len(data.images) == 10 and data.labels.min() >= 0 and data.labels.max() < 10
        batches = list(data.images.batches(4))
    images = np.concatenate([b for b, _ in batches])
    assert images.shape == (10, 8, 8, 3) and data.images.skipped == 0
    assert (data.images._cache is None) == (cache_mb == 0)


def test_class_names_from_features_metadata_and_label_key():
    with tfds.testing.mock_data(num_examples=6):
        data = datasets.load_classification(dict(type="tfds", name="softalign_tiny_pets", split="train[:50%]",
                                                 max_examples=4), CTX)
        species = datasets.load_classification(dict(type="tfds", name="softalign_tiny_pets",
                                                    label_key="species"), CTX)
    assert data.classnames == ["red fox", "tabby cat", "border collie"]  # 'label' preferred, '_' -> ' '
    assert len(data.images) == 4 and set(data.labels) <= {0, 1, 2}
    assert species.classnames == ["cat", "dog"]


def test_captions_from_a_sequence_feature():
    with tfds.testing.mock_data(num_examples=3, num_sub_examples=2):
        data = datasets.load_captions(dict(type="tfds", name="softalign_tiny_captions", split="val"), CTX)
        counts = np.bincount(data.text_to_image, minlength=3)
        assert len(data.captions) == counts.sum() and (counts > 0).all()
        assert all(isinstance(c, str) and c for c in data.captions)  # caption_key auto-detected: captions/text


def test_zeroshot_evaluator_on_tfds():
    import jax
    import jax.numpy as jnp

    from softalign.data.pipeline import default_data_config

    class _Config:
        data = default_data_config()
        eval_batch_size = 4

    _Config.data.image_size = 8

    class _Tok:
        def encode_batch(self, texts):
            return np.array([[len(t)] for t in texts], np.int32)

    evals = {"pets": dict(kind="zeroshot", dataset=dict(type="tfds", name="softalign_tiny_pets", split="test"),
                          templates=["a photo of a {}."])}
    with tfds.testing.mock_data(num_examples=5):
        (ev,) = suite.build_evaluators(_Config, _Tok(), evals=evals)
    m = ev.run(jax.jit(lambda x: jnp.ones((x.shape[0], 3))), jax.jit(lambda t: jax.nn.one_hot(t[:, 0] % 3, 3)))
    assert set(m) == {"top1", "top5", "mean_per_class_recall"} and m["top5"] == 1.0
    assert ev.chance == {"top1": pytest.approx(1 / 3), "top5": 1.0, "mean_per_class_recall": pytest.approx(1 / 3)}


def test_missing_tfds_dataset_is_a_config_error(tmp_path):
    from softalign.config.errors import ConfigError
    with pytest.raises(ConfigError, match="tfds.data_source\\('softalign_no_such_dataset'"):
        datasets.load_classification(dict(type="tfds", name="softalign_no_such_dataset",
                                          data_dir=str(tmp_path)), CTX)
