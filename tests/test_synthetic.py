"""Tests for the procedural SyntheticScenes source: determinism, splits, caption noise and pixel content."""

import numpy as np
import pytest

from softalign.data import synthetic
from softalign.data.synthetic import (
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    SyntheticScenes,
    attribute_classnames,
    attribute_prompts,
    caption_corpus,
)


def _same(a: dict, b: dict) -> bool:
    return (np.array_equal(a["image"], b["image"]) and a["caption"] == b["caption"]
            and a["index"] == b["index"] and a["labels"] == b["labels"])


def test_record_structure_and_sizes():
    for size in (32, 64):
        rec = SyntheticScenes("train", 10, image_size=size)[3]
        assert rec["image"].shape == (size, size, 3) and rec["image"].dtype == np.uint8
        assert isinstance(rec["caption"], str) and rec["caption"]
        assert rec["index"] == 3 and rec["caption_swapped"] is False
        assert set(rec["labels"]) == {"color", "shape", "size", "position", "num_objects"}
        assert 1 <= rec["labels"]["num_objects"] <= 3


def test_deterministic_random_access():
    a, b = SyntheticScenes("train", 500, seed=3), SyntheticScenes("train", 500, seed=3)
    forward = [a[i] for i in (0, 7, 499)]
    backward = [b[i] for i in (499, 7, 0)][::-1]
    assert all(_same(x, y) for x, y in zip(forward, backward))
    assert _same(a[-1], a[499])
    assert not np.array_equal(SyntheticScenes("train", 500, seed=4)[7]["image"], forward[1]["image"])
    with pytest.raises(IndexError):
        a[500]


def test_train_and_heldout_are_disjoint():
    train, heldout = SyntheticScenes("train", 200), SyntheticScenes("heldout", 200)
    train_imgs = {train[i]["image"].tobytes() for i in range(200)}
    held = [heldout[i] for i in range(200)]
    assert not train_imgs & {r["image"].tobytes() for r in held}
    same_caption = sum(train[i]["caption"] == held[i]["caption"] for i in range(200))
    assert same_caption < 10


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        SyntheticScenes("validation", 10)
    with pytest.raises(ValueError):
        SyntheticScenes("train", 10, caption_noise=1.5)
    with pytest.raises(ValueError):
        SyntheticScenes("train", 10, max_objects=0)


def test_caption_noise_rate_and_determinism():
    n, rate = 2000, 0.3
    noisy = SyntheticScenes("train", n, seed=1, caption_noise=rate)
    clean = SyntheticScenes("train", n, seed=1)
    swapped = [noisy._swap_partner(i) is not None for i in range(n)]
    assert abs(np.mean(swapped) - rate) < 0.035
    again = SyntheticScenes("train", n, seed=1, caption_noise=rate)
    order = np.random.default_rng(0).permutation(n)[:300]
    assert all(again.caption(i) == noisy.caption(i) for i in order)
    clean_caps = [clean.caption(i) for i in range(n)]
    for i in np.flatnonzero(swapped)[:50]:
        rec = noisy[int(i)]
        assert rec["caption_swapped"] and rec["caption"] in clean_caps
        assert np.array_equal(rec["image"], clean[int(i)]["image"])   # only the caption moves
    assert not any(SyntheticScenes("train", 300, caption_noise=0.0)[i]["caption_swapped"]
                   for i in range(0, 300, 7))


def _object_pixels(rec: dict) -> np.ndarray:
    """Pixels of the first object's grid cell that stand out from the background."""
    img = rec["image"].astype(np.int32)
    row, col = divmod(rec["labels"]["position"], 3)
    cell = img.shape[0] // 3
    region = img[row * cell:(row + 1) * cell, col * cell:(col + 1) * cell].reshape(-1, 3)
    background = np.median(img.reshape(-1, 3), axis=0)
    return region[np.abs(region - background).sum(-1) > 120]


def test_colours_show_up_in_the_object_region():
    src = SyntheticScenes("heldout", 400, single_object=True)
    checked = 0
    for i in range(400):
        rec = src[i]
        colour = COLORS[rec["labels"]["color"]]
        if colour not in ("red", "green", "blue") or SIZES[rec["labels"]["size"]] != "large":
            continue
        mean = _object_pixels(rec).mean(0)
        channel = ("red", "green", "blue").index(colour)
        others = [mean[c] for c in range(3) if c != channel]
        assert mean[channel] > max(others) + 80, (colour, mean, rec["caption"])
        checked += 1
    assert checked >= 20


def _scene(shape: str) -> synthetic._Scene:
    obj = synthetic._Object(color=0, shape=SHAPES.index(shape), size=1, position=4, offset=(0.0, 0.0),
                            rgb=(250.0, 250.0, 250.0))
    return synthetic._Scene((obj,), (0.0, 0.0, 0.0))


def test_shapes_render_differently():
    masks = {s: synthetic.render_scene(_scene(s), 64, np.random.default_rng(0)).mean(-1) > 128
             for s in SHAPES}
    centre = 32
    assert masks["circle"][centre, centre] and not masks["ring"][centre, centre]
    r = int(0.42 * 64 / 3)   # large radius unit in pixels (8.96 -> 8)
    corner = (centre - 6, centre - 6)   # inside the square, outside the diamond and the cross
    assert masks["square"][corner] and not masks["diamond"][corner] and not masks["cross"][corner]
    tri = masks["triangle"]
    assert tri[centre + r // 2 - 1].sum() > tri[centre - r // 2].sum()   # wide base, narrow apex
    flat = [m.tobytes() for m in masks.values()]
    assert len(set(flat)) == len(SHAPES)


def test_captions_are_varied_partial_and_consistent():
    src = SyntheticScenes("train", 600, seed=2)
    recs = [src[i] for i in range(600)]
    caps = [r["caption"].lower() for r in recs]
    assert len(set(caps)) > 550
    assert any(not any(p in c for p in ("top", "bottom", "left", "right", "center", "middle"))
               for c in caps)
    assert any("small" in c or "little" in c for c in caps) and any("large" in c or "big" in c for c in caps)
    for rec, cap in zip(recs, caps):
        words = COLORS + SHAPES + ("disk", "block", "donut", "plus", "small", "little", "large", "big",
                                   "top", "bottom", "left", "right", "center", "middle")
        assert sum(w in cap for w in words) >= 1, cap   # never an attribute-free phrase
        for k, word in enumerate(("one shape:", "two shapes:", "three shapes:")):
            if cap.startswith(word):
                assert rec["labels"]["num_objects"] == k + 1


def test_classnames_prompts_and_corpus():
    assert attribute_classnames("color") == list(COLORS) and len(COLORS) >= 8
    assert attribute_classnames("position") == list(POSITIONS) and len(SHAPES) >= 6
    for attr in ("color", "shape", "size", "position"):
        assert len(attribute_prompts(attr)) == len(attribute_classnames(attr))
    with pytest.raises(ValueError):
        attribute_classnames("texture")
    assert caption_corpus(50, seed=1) == caption_corpus(50, seed=1)
    assert caption_corpus(50, seed=1) != caption_corpus(50, seed=2)
    src = SyntheticScenes("heldout", 5)
    assert "heldout" in repr(src) and "5 scenes" in src.describe()


def test_color_weights_change_only_the_colours_and_follow_the_weights():
    n, weights = 3000, (8.0, 4.0, 2.0, 1.0, 1.0, 0.0, 0.5, 0.5)
    uniform = SyntheticScenes("train", n, seed=2)
    skewed = SyntheticScenes("train", n, seed=2, color_weights=weights)
    counts = np.zeros(len(COLORS))
    for i in range(n):
        a, b = uniform.scene_and_parts(i)[0], skewed.scene_and_parts(i)[0]
        assert [(o.shape, o.size, o.position, o.offset) for o in a.objects] == \
               [(o.shape, o.size, o.position, o.offset) for o in b.objects]
        for o in b.objects:
            counts[o.color] += 1
    expected = np.asarray(weights) / sum(weights) * counts.sum()
    assert counts[5] == 0                                          # a zero weight never occurs
    live = expected > 0
    chi2 = np.sum((counts[live] - expected[live]) ** 2 / expected[live])
    assert chi2 < 24.3, (counts, expected)                         # 7 dof: p = 0.001
    # deterministic, and empty weights are the uniform scenes themselves
    again = SyntheticScenes("train", n, seed=2, color_weights=weights)
    assert _same(again[17], skewed[17]) and "color_weights" in repr(skewed) and "colour weights" in skewed.describe()
    assert _same(SyntheticScenes("train", n, seed=2, color_weights=())[17], uniform[17])
    for bad, message in (((1.0, 2.0), "one weight per colour"), ((1.0,) * 7 + (-1.0,), "non-negative"),
                         ((0.0,) * 8, "not all zero"), ((float("nan"),) * 8, "finite")):
        with pytest.raises(ValueError, match=message):
            SyntheticScenes("train", 10, color_weights=bad)


def test_color_weights_reach_the_train_split_only_and_are_checked_in_the_config():
    from softalign.config import checks
    from softalign.config.schema import base_config
    from softalign.data import pipeline, sources

    data = pipeline.default_data_config()
    data.update(dict(train_size=200, heldout_size=20, color_weights=(1.0,) + (0.0,) * 7))
    train = sources.build_source(data, "train")
    assert all(o.color == 0 for i in range(200) for o in train.scene_and_parts(i)[0].objects)
    assert sources.build_source(data, "heldout").color_weights == ()
    c = base_config()
    c.data.color_weights = (1.0, 2.0)
    with pytest.raises(checks.ConfigError, match="one weight per colour"):
        checks.validate(c, num_data_shards=1)
    c.data.color_weights, c.data.source, c.data.name = (1.0,) * 8, "tfds", "cifar10"
    with pytest.raises(checks.ConfigError, match="read by the synthetic source only"):
        checks.validate(c, num_data_shards=1)
