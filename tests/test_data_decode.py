"""Decoding and validation: colour modes to RGB, draft-mode JPEG decoding, the pixel limit, bad images and
captions by reason, eval resizing, and the thread-safe skip counter."""

import concurrent.futures
import pickle

import data_fixtures
import numpy as np
import pytest
from PIL import Image

from softalign.data import decode, pipeline, skips
from softalign.data.skips import BadRecord
from softalign.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def rgb():
    return data_fixtures.natural_image(np.random.default_rng(0), 80, 60)


@pytest.mark.parametrize("mode,fmt,options", [
    ("L", "JPEG", {}), ("CMYK", "JPEG", {}), ("P", "PNG", {}), ("P", "PNG", {"transparency": 0}),
    ("RGBA", "PNG", {}), ("LA", "PNG", {}), ("1", "PNG", {}), ("RGB", "WEBP", {}), ("RGB", "BMP", {}),
])
def test_colour_modes_become_rgb(rgb, mode, fmt, options):
    data = data_fixtures.encode(Image.fromarray(rgb).convert(mode), fmt, **options)
    image = decode.decode_image(data)
    assert image.mode == "RGB" and image.size == (80, 60)
    arr = np.asarray(image)
    assert arr.shape == (60, 80, 3) and arr.dtype == np.uint8
    if mode == "CMYK":     # colours survive the CMYK round trip
        assert np.abs(arr.astype(int) - rgb.astype(int)).mean() < 12


def test_16_bit_images_are_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    arr = np.asarray(decode.decode_image(data_fixtures.encode(Image.fromarray(ramp), "PNG")))
    assert arr.shape == (48, 64, 3) and arr.min() == 0 and arr.max() == 255
    assert 120 < arr.mean() < 135          # a clip at 255 would make most of the ramp white
    rgb16 = np.stack([ramp] * 3, axis=-1)
    assert decode.array_to_rgb(rgb16).max() == 255
    assert decode.array_to_rgb(np.ones((4, 5), np.float32)).max() == 255
    assert decode.array_to_rgb(np.zeros((4, 5, 4), np.uint8)).shape == (4, 5, 3)


def test_draft_mode_decodes_jpeg_smaller(rgb):
    big = data_fixtures.encode(data_fixtures.natural_image(np.random.default_rng(1), 800, 600), "JPEG")
    assert decode.decode_image(big).size == (800, 600)
    assert decode.decode_image(big, min_size=100).size == (200, 150)    # 1/4: both sides still >= 100
    assert decode.decode_image(big, min_size=300).size == (400, 300)    # 1/2 keeps the short side at 300
    assert decode.decode_image(big, min_size=301).size == (800, 600)
    assert min(decode.decode_image(big, min_size=140).size) >= 140
    assert decode.draft_size(224, 0.9) == 237 and decode.draft_size(64) == 64


def test_bad_images_by_reason(rgb):
    for reason, data in data_fixtures.bad_images(np.random.default_rng(2)).items():
        with pytest.raises(BadRecord) as err:
            decode.decode_image(data, min_size=32)
        assert err.value.reason == reason
    with pytest.raises(BadRecord, match="decompression_bomb"):          # below PIL's own limit, above ours
        decode.decode_image(data_fixtures.encode(Image.new("RGB", (1200, 1000)), "JPEG"), pixel_limit=1_000_000)
    with pytest.raises(BadRecord, match="truncated_image"):
        decode.decode_image(data_fixtures.encode(rgb, "JPEG")[:400])
    png = data_fixtures.encode(rgb, "PNG")
    with pytest.raises(BadRecord) as err:
        decode.decode_image(png[: len(png) // 2])
    assert err.value.reason in (skips.TRUNCATED_IMAGE, skips.BAD_IMAGE)


def test_truncation_caught_even_when_pil_is_told_to_load_truncated_images(rgb, monkeypatch):
    from PIL import ImageFile
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)      # some library set it globally
    with pytest.raises(BadRecord, match="truncated_image"):
        decode.decode_image(data_fixtures.encode(rgb, "JPEG")[:-200])


def test_captions():
    assert decode.check_caption(b"  a dog \n") == "a dog"
    assert decode.check_caption(np.bytes_(b"x")) == "x"
    for value, reason in [(b"", skips.EMPTY_CAPTION), ("", skips.EMPTY_CAPTION), (" \t\n", skips.WHITESPACE_CAPTION),
                          (b"\xff\xfe", skips.CAPTION_NOT_UTF8), ("caf\udce9", skips.CAPTION_NOT_UTF8),
                          (None, skips.MISSING_CAPTION)]:
        with pytest.raises(BadRecord) as err:
            decode.check_caption(value)
        assert err.value.reason == reason
    good, dropped = decode.check_captions([b"", "ok", b"\xff", "fine"])
    assert good == ["ok", "fine"]
    assert dropped == {"dropped_caption/empty_caption": 1, "dropped_caption/caption_not_utf8": 1}
    with pytest.raises(BadRecord, match="whitespace_caption"):
        decode.check_captions(["  ", ""])
    assert decode.raw_captions({"caption": "x"}) == ["x"]
    assert decode.raw_captions({"captions": np.array([b"a", b"b"])}) == [b"a", b"b"]
    assert decode.raw_captions({}) == []


def test_prepare_and_long_caption(rgb):
    tok = Tokenizer.train_bpe(["a dog runs along the beach"] * 10, vocab_size=270, context_length=12)
    good = decode.prepare({"image": data_fixtures.encode(rgb, "JPEG"), "captions": [data_fixtures.long_caption()],
                           "index": 7})
    assert good["index"] == 7 and len(good["captions"][0]) > 99_000
    row = tok.encode(good["captions"][0])
    assert row[-1] == tok.eot_id and np.all(row[1:-1] != tok.pad_id)     # truncated, eot last
    assert decode.prepare({"index": 3, "_skip": "corrupt_record"}) == skips.Skipped("corrupt_record", 3)
    bad = decode.prepare({"image": b"", "caption": "x", "index": 1})
    assert bad == skips.Skipped("empty_image", 1)
    assert pickle.loads(pickle.dumps(bad)) == bad
    arr = decode.prepare({"image": rgb, "caption": "x", "labels": {"a": 1}})
    assert arr["image"].shape == (60, 80, 3) and arr["labels"] == {"a": 1}


def test_eval_resize_and_train_crop(rgb):
    out = decode.resize_center(Image.fromarray(rgb), 32)
    assert out.shape == (32, 32, 3)
    np.testing.assert_array_equal(decode.resize_center(rgb[:32, :32], 32), rgb[:32, :32])
    crop = pipeline.DecodeAndAugment(24, (0.5, 1.0))
    element = crop.random_map({"image": data_fixtures.encode(rgb, "JPEG"), "captions": ["a", "b"], "index": 0},
                              np.random.default_rng(0))
    assert element["image"].shape == (24, 24, 3) and element["caption"] in ("a", "b")
    assert crop.random_map(skips.Skipped("x"), np.random.default_rng(0)) == skips.Skipped("x")


def test_counter_is_thread_safe_and_formats_metrics():
    skips.reset()

    def work(_):
        for _ in range(1000):
            skips.count(skips.EMPTY_IMAGE)
        skips.add_counts({"skipped/bad_image": 1, "served": 4, "caption_swapped": 1})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(16)))
    assert skips.counts() == {"skipped/empty_image": 16_000, "skipped/bad_image": 16}
    assert skips.skipped() == {"empty_image": 16_000, "bad_image": 16}
    metrics = skips.data_metrics()
    assert metrics["data/skipped/empty_image"] == 16_000 and metrics["data/caption_noise/realised"] == 0.25
    assert skips.count_once("shard-a", skips.CORRUPT_SHARD) and not skips.count_once("shard-a", skips.CORRUPT_SHARD)
    assert skips.counts()["skipped/corrupt_shard"] == 1
    skips.reset()
    assert skips.counts() == {} and skips.data_metrics() == {}
