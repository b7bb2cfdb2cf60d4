"""Evaluation datasets from specs: image folders, captions CSV + splits.json, COCO json, corrupt images skipped and
counted, spec errors, and the streaming image embedding (padded last batch, one compilation)."""

from __future__ import annotations

import csv
import io
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from softalign.config.errors import ConfigError
from softalign.data.pipeline import CLIP_MEAN, CLIP_STD
from softalign.evaluation import datasets, suite
from softalign.evaluation.images import ImageSet, embed_images

SIZE = 8
CTX = datasets.ImageContext(SIZE, CLIP_MEAN, CLIP_STD)
COLOURS = {"red_fox": (220, 30, 30), "green": (30, 200, 40), "blue_sky": (40, 60, 230)}


def _jpeg(path, colour, size=(20, 14), mode="RGB"):
    image = Image.new("RGB", size, colour)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path, quality=95)


def _corrupt(path):
    """Random bytes named .jpg, and a JPEG cut in half (both must be skipped, not crash)."""
    with open(path, "wb") as f:
        f.write(b"\x00not a jpeg at all" * 10)


def _truncated(path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "JPEG")
    with open(path, "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "mini" / "test"
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(3):
            _jpeg(root / name / f"{i}.jpg", colour, size=(20 + 7 * i, 14 + 3 * i), mode="L" if i == 2 else "RGB")
    Image.new("RGBA", (10, 10), (*COLOURS["green"], 128)).save(root / "green" / "alpha.png")
    _corrupt(root / "green" / "bad.jpg")
    _truncated(root / "blue_sky" / "cut.jpg")
    (root / "blue_sky" / "notes.txt").write_text("not an image")
    return root


def _all(images: ImageSet):
    batches = list(images.batches(4))
    return np.concatenate([b for b, _ in batches]), np.concatenate([i for _, i in batches]), batches


def test_image_folder_skips_and_counts_corrupt_images(folder, caplog):
    data = datasets.load_classification(dict(type="folder", path=str(folder)), CTX)
    assert data.name == "mini" and data.templates_key == "mini"  # the split-like leaf 'test' is skipped
    assert data.classnames == ["blue sky", "green", "red fox"]
    assert len(data.images) == 12  # 3 + 1 corrupt, 3 + png + corrupt, 3 (notes.txt ignored)
    with caplog.at_level(logging.WARNING):
        images, kept, batches = _all(data.images)
    assert data.images.skipped == 2 and data.images.complete
    assert "skipped 2 unreadable image(s) of 12" in caplog.text and "bad.jpg" in caplog.text
    assert images.shape == (10, SIZE, SIZE, 3) and images.dtype == np.float32
    assert [len(b) for b, _ in batches] == [4, 4, 2]  # full batches of readable images, short last one
    labels = data.labels[kept]
    assert np.bincount(labels).tolist() == [3, 4, 3]
    # Colours survive decode -> RGB -> resize/crop -> normalise (greyscale and RGBA converted to RGB).
    pixels = images * np.asarray(CLIP_STD) + np.asarray(CLIP_MEAN)
    mean_rgb = pixels.reshape(len(pixels), -1, 3).mean(1) * 255
    for k, label in enumerate(labels):
        expected = np.asarray(COLOURS[["blue_sky", "green", "red_fox"][label]], np.float32)
        if data.images._describe(int(kept[k])).endswith("2.jpg"):
            expected = np.full(3, expected @ [0.299, 0.587, 0.114])  # the greyscale one
        assert np.abs(mean_rgb[k] - expected).max() < 12, (data.images._describe(int(kept[k])), mean_rgb[k])
    # A second pass serves the cache (no new warnings, same images).
    caplog.clear()
    again, kept2, _ = _all(data.images)
    np.testing.assert_array_equal(again, images)
    np.testing.assert_array_equal(kept2, kept)
    assert "unreadable" not in caplog.text


def test_folder_options_subset_classnames_and_no_cache(folder):
    spec = dict(type="folder", path=str(folder), max_examples=5, subset_seed=1, cache_mb=0, name="colours",
                classnames=["sky", "grass", "fox"])
    data = datasets.load_classification(spec, CTX)
    assert len(data.images) == 5 and data.name == "colours" and data.classnames == ["sky", "grass", "fox"]
    assert data.images._cache is None
    other = datasets.load_classification(dict(spec, subset_seed=2), CTX)
    assert [data.images._describe(i) for i in range(5)] != [other.images._describe(i) for i in range(5)]
    data.images.load_all()
    assert data.images.complete
    with pytest.raises(ConfigError, match="2 class names given for a dataset with 3 classes"):
        datasets.load_classification(dict(spec, classnames=["a", "b"]), CTX)


def _flickr_like(tmp_path):
    root = tmp_path / "flickr"
    (root / "images").mkdir(parents=True)
    names = [f"im{i}.jpg" for i in range(6)]
    for i, name in enumerate(names):
        _jpeg(root / "images" / name, (40 * i, 100, 200 - 30 * i), size=(24, 16))
    _corrupt(root / "images" / "im4.jpg")
    with open(root / "captions.txt", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        for i, name in enumerate(names):
            for j in range(5 if i != 2 else 3):
                w.writerow([name, f"picture {i}, caption {j}" if j else f'a "quoted", comma caption {i}'])
        w.writerow(["unlisted.jpg", "no such file"])
    json.dump({"train": names[:2], "val": names[2:] + ["no_captions.jpg"]}, open(root / "splits.json", "w"))
    return root


def test_captions_csv_with_splits_and_corrupt_image(tmp_path, caplog):
    root = _flickr_like(tmp_path)
    with caplog.at_level(logging.WARNING):
        data = datasets.load_captions(dict(type="captions", path=str(root), split="val"), CTX)
    assert "no_captions.jpg" in caplog.text  # listed in the split but captionless: left out with a warning
    assert data.name == "flickr-val" and len(data.images) == 4
    assert len(data.captions) == 3 + 5 + 5 + 5
    assert data.captions[0] == 'a "quoted", comma caption 2'
    np.testing.assert_array_equal(np.bincount(data.text_to_image), [3, 5, 5, 5])
    _, kept, _ = _all(data.images)
    assert data.images.skipped == 1 and kept.tolist() == [0, 1, 3]  # im4 (index 2 of the split) is corrupt
    captions, owners = data.keep_images(kept)
    assert len(captions) == 13 and owners.tolist() == [0] * 3 + [1] * 5 + [2] * 5
    assert not any(data.captions[c].startswith("picture 4,") or data.captions[c].endswith("comma caption 4")
                   for c in captions)  # im4's captions are gone with it

    everything = datasets.load_captions(dict(type="captions", path=str(root)), CTX)  # no split: every captioned
    assert len(everything.images) == 7  # 6 + unlisted.jpg (missing file -> unreadable when read)
    everything.images.load_all()
    assert everything.images.skipped == 2
    with pytest.raises(ConfigError, match="split='test' is not in"):
        datasets.load_captions(dict(type="captions", path=str(root), split="test"), CTX)


def test_retrieval_evaluator_reports_skips_and_remaps_captions(tmp_path):
    root = _flickr_like(tmp_path)

    class _Config:
        class data:  # noqa: N801 - a stand-in for config.data
            image_size, mean, std = SIZE, CLIP_MEAN, CLIP_STD

            @staticmethod
            def get(key, default=None):
                return getattr(_Config.data, key, default)

        eval_batch_size = 4

    class _Tok:  # Caption j -> token = the image number written in it.
        def encode_batch(self, texts):
            return np.array([[int(t.split()[-1][0]) if t[0] == "a" else int(t.split()[1][0])] for t in texts],
                            np.int32)

    evals = {"flickr": dict(kind="retrieval", dataset=dict(type="captions", path=str(root), split="val"))}
    (ev,) = suite.build_evaluators(_Config, _Tok(), evals=evals)
    # Image embedding: one-hot of its mean red level (40 * i) // 40 -> i; text: one-hot of its image number.
    red = lambda x: (x[..., 0].mean((1, 2)) * CLIP_STD[0] + CLIP_MEAN[0]) * 255
    enc_img = jax.jit(lambda x: jax.nn.one_hot(jnp.round(red(x) / 40).astype(jnp.int32), 8))
    enc_txt = jax.jit(lambda t: jax.nn.one_hot(t[:, 0], 8))
    m = ev.run(enc_img, enc_txt)
    assert m["skipped_images"] == 1
    assert m["i2t_R@1"] == 1.0 and m["t2i_R@1"] == 1.0 and m["t2i_mean_rank"] == 1.0
    assert m["skipped/not_an_image"] == 1  # named as the training pipeline names it
    assert ev.chance["t2i_R@1"] == pytest.approx(1 / 3)  # chance of the 3 images scored, not of the 4 listed
    assert any("skipped_images = 1" in line for line in suite.report_lines("flickr", m, ev.chance))


def test_coco_captions_json(tmp_path):
    (tmp_path / "val2017").mkdir()
    for i in (1, 2, 3):
        _jpeg(tmp_path / "val2017" / f"{i:012d}.jpg", (10 * i, 20, 30))
    coco = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (3, 1, 2)],
            "annotations": [{"image_id": 1, "caption": "one"}, {"image_id": 3, "caption": "three"},
                            {"image_id": 1, "caption": " uno "}, {"image_id": 9, "caption": "orphan"}]}
    json.dump(coco, open(tmp_path / "captions_val2017.json", "w"))
    data = datasets.load_captions(dict(type="coco", images=str(tmp_path / "val2017"),
                                       annotations=str(tmp_path / "captions_val2017.json")), CTX)
    assert data.name == "captions_val2017" and len(data.images) == 2  # image 2 has no caption
    assert data.captions == ["one", "uno", "three"] and data.text_to_image.tolist() == [0, 0, 1]


@pytest.mark.parametrize("spec,message", [
    (dict(type="folder", path="/no/such/dir"), "dataset.path='/no/such/dir': no such directory"),
    (dict(type="folder", path=".", colour="red"), "unknown key(s) ['colour']"),
    (dict(type="imagenet"), "classification datasets are one of"),
    (dict(type="captions", path="."), "classification datasets are one of"),
    (dict(type="synthetic", attribute="texture"), "unknown attribute 'texture'"),
    (dict(type="tfds"), "name: the TFDS dataset name"),
])
def test_bad_specs_fail_with_the_key_named(spec, message):
    with pytest.raises(ConfigError) as err:
        datasets.load_classification(spec, CTX)
    assert message in str(err.value)


def test_embed_images_pads_compiles_once_and_skips():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (11, SIZE, SIZE, 3), np.uint8)
    bad = {3, 7}
    images = ImageSet(11, lambda i: b"broken" if i in bad else pixels[i], image_size=SIZE, name="t")
    traces = []

    @jax.jit
    def enc(x):
        traces.append(x.shape)
        return x.reshape(x.shape[0], -1)[:, :5]

    done = []
    emb, kept = embed_images(enc, images, 4, progress=lambda d, t: done.append((d, t)))
    assert traces == [(4, SIZE, SIZE, 3)]
    assert kept.tolist() == [i for i in range(11) if i not in bad] and images.skipped == 2
    expected = ((pixels[kept] / 255.0 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)).reshape(9, -1)[:, :5]
    np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-5)
    assert done[-1] == (11, 11)
    with pytest.raises(ValueError, match="none of the 2 images could be read"):
        embed_images(enc, ImageSet(2, lambda i: b"", image_size=SIZE, name="empty"), 4)
