"""The synthetic scenes' exact ground truth: hand-made scenes, a brute-force reference, the generator's own
captions re-parsed from their text, caption noise, and the fields reaching the train batch."""

import itertools
import re

import numpy as np
import pytest

from softalign.data import pipeline, scene_truth, synthetic
from softalign.data.scene_truth import ABSENT, FREE, compatibility, compatible, encode_caption, encode_scene
from softalign.data.synthetic import COLORS, POSITIONS, SHAPES, SIZES, SyntheticScenes

C, S, Z, P = ({n: i for i, n in enumerate(t)} for t in (COLORS, SHAPES, SIZES, POSITIONS))
_ = FREE


def obj(color=_, shape=_, size=_, pos=_):
    return (C[color] if color != _ else _, S[shape] if shape != _ else _, Z[size] if size != _ else _,
            P[pos] if pos != _ else _)


def scene(*objects, k=3):
    return encode_scene([obj(*o) for o in objects], k)


def caption(*objects, count=-1, k=3):
    return encode_caption([obj(*o) for o in objects], k, count)


SCENE = scene(("red", "circle", "small", "top"), ("red", "square", "large", "left"),
              ("blue", "ring", "small", "center"))


@pytest.mark.parametrize("cap,expected", [
    (caption(("red",)), True),                                           # omitted attributes are free
    (caption(("red",), ("red",)), True),                                 # two red objects exist
    (caption(("red",), ("red",), ("red",)), False),                      # ... but not three
    (caption(("red", "circle"), ("red", "circle")), False),              # distinct objects: one red circle only
    (caption(("red", "square"), ("red", _, "small")), True),             # matching must pick the circle for #2
    (caption(("red", _, "small"), ("red", "square")), True),             # order in the caption does not matter
    (caption(("red", _, _, "top"), ("red", _, _, "top")), False),
    (caption(("blue", "circle")), False),                                # attributes bind to one object
    (caption((_, "ring", "small", "center")), True),
    (caption((_, "ring", "large")), False),
    (caption(("red",), count=3), True),                                  # stated count = scene count
    (caption(("red",), count=2), False),
    (caption((_, _, _, "bottom")), False),
    (caption(), True),                                                   # states nothing
])
def test_hand_made_scene(cap, expected):
    assert compatible(cap, SCENE) is expected


def test_one_object_scene_and_count():
    one = scene(("green", "cross", "large", "bottom right"))
    assert compatible(caption(("green", "cross"), count=1), one)
    assert not compatible(caption(("green",), ("green",)), one)
    assert not compatible(caption(("green",), count=2), one)


def _brute_force(cap, sc):
    named = [r for r in cap[:-1] if r[0] != ABSENT]
    objects = [r for r in sc if r[0] != scene_truth.EMPTY]
    count = int(cap[-1, 0])
    if count >= 0 and count != len(objects):
        return False
    fits = lambda r, o: all(a == FREE or a == b for a, b in zip(r, o))
    return any(all(fits(r, objects[m]) for r, m in zip(named, perm))
               for perm in itertools.permutations(range(len(objects)), len(named)))


def _random_arrays(rng, n, k):
    """Small attribute ranges, so that many pairs are compatible and matchings are contested."""
    scenes, caps = [], []
    for _ in range(n):
        m = int(rng.integers(1, k + 1))
        scenes.append(encode_scene(rng.integers(0, 2, (m, 4)), k))
        named = rng.integers(-1, 2, (int(rng.integers(0, k + 1)), 4))
        caps.append(encode_caption(named, k, int(rng.choice([-1, -1, m, 1, 2]))))
    return np.stack(caps), np.stack(scenes)


@pytest.mark.parametrize("k", [1, 3, 4])
def test_vectorised_matches_brute_force(k):
    caps, scenes = _random_arrays(np.random.default_rng(k), 60, k)
    got = compatibility(caps, scenes)
    want = np.array([[_brute_force(c, s) for c in caps] for s in scenes])
    assert got.shape == (60, 60) and 0.05 < want.mean() < 0.95
    np.testing.assert_array_equal(got, want)


def test_jax_version_is_the_same():
    import jax.numpy as jnp
    caps, scenes = _random_arrays(np.random.default_rng(0), 40, 3)
    np.testing.assert_array_equal(np.asarray(compatibility(jnp.asarray(caps), jnp.asarray(scenes), xp=jnp)),
                                  compatibility(caps, scenes))


# ----------------------------------------------------------------------------- the generator's own captions

_WORDS = {**{w: ("size", Z[s]) for s, ws in synthetic._SIZE_WORDS.items() for w in ws},
          **{c: ("color", C[c]) for c in COLORS},
          **{w: ("shape", S[s]) for s, ws in synthetic._SHAPE_WORDS.items() for w in ws},
          "shape": ("shape", FREE), "object": ("shape", FREE)}
_PLACES = sorted(((p, P[pos]) for pos, ps in synthetic._POSITION_PHRASES.items() for p in ps), key=lambda x: -len(x[0]))
_NUMBERS = {n: i + 1 for i, n in enumerate(synthetic.NUMBERS)}


def parse(text):
    """An independent reading of a caption's text: (named objects, count)."""
    text = text[0].lower() + text[1:]
    count = -1
    m = re.match(r"^(\w+) shapes?: (.*)$", text)
    if m and m.group(1) in _NUMBERS:
        count, text = _NUMBERS[m.group(1)], m.group(2)
    for prefix in ("a picture of ", "there is ", "an image of ", "an image with ", "a dark background with "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    text = text.removesuffix(".").removesuffix(" on a dark background")
    objects = []
    for phrase in re.split(r", | and ", text):
        row = {"color": FREE, "shape": FREE, "size": FREE, "position": FREE}
        for place, p in _PLACES:
            if phrase.endswith(" " + place):
                row["position"], phrase = p, phrase[:-len(place) - 1]
                break
        words = phrase.split()[1:]                      # drop the article
        if words[-2:] == ["plus", "sign"]:
            words = words[:-2] + ["plus sign"]
        for w in words:
            attr, value = _WORDS[w]
            row[attr] = value
        objects.append(tuple(row[a] for a in synthetic.ATTRIBUTES))
    return objects, count


def test_caption_arrays_match_the_text_and_are_true_of_their_scene():
    src = SyntheticScenes("heldout", 1500, seed=5)
    caps, scenes, counts = [], [], set()
    for i in range(1500):
        truth = src.truth(i)
        named, count = parse(src.caption(i))
        np.testing.assert_array_equal(truth[scene_truth.CAPTION], encode_caption(named, 3, count),
                                      err_msg=src.caption(i))
        caps.append(truth[scene_truth.CAPTION])
        scenes.append(truth[scene_truth.SCENE])
        counts.add(count)
    assert counts == {-1, 1, 2, 3}
    g = compatibility(np.stack(caps), np.stack(scenes))
    assert g.diagonal().all()                              # a clean caption is true of its own scene
    off = g[~np.eye(len(g), dtype=bool)].mean()
    assert 0.001 < off < 0.05, off                         # many-to-many, but not trivially so
    assert all(np.array_equal(src[i]["truth"][scene_truth.CAPTION], caps[i]) for i in range(0, 1500, 97))


def test_caption_noise_fields():
    clean = SyntheticScenes("train", 400, seed=1)
    noisy = SyntheticScenes("train", 400, seed=1, caption_noise=0.5)
    swapped = 0
    for i in range(400):
        t, c = noisy.truth(i), clean.truth(i)
        np.testing.assert_array_equal(t[scene_truth.SCENE], c[scene_truth.SCENE])
        src = int(t[scene_truth.CAPTION_FROM])
        assert bool(t[scene_truth.SWAPPED]) == (src != i) == noisy[i]["caption_swapped"]
        np.testing.assert_array_equal(t[scene_truth.CAPTION], clean.truth(src)[scene_truth.CAPTION])
        assert noisy.caption(i) == clean.caption(src)
        swapped += src != i
    assert 160 < swapped < 240


def test_train_batches_carry_the_truth():
    from softalign.data.tokenizer import Tokenizer
    cfg = pipeline.default_data_config()
    cfg.update(image_size=8, train_size=64, caption_noise=0.5, num_threads=0, prefetch_buffer_size=1,
               batch_prefetch=0)
    tok = Tokenizer.train_bpe(synthetic.caption_corpus(300), vocab_size=300, context_length=24)
    batch = next(pipeline.make_train_iterator(cfg, tok, global_batch_size=16, seed=0))
    src = SyntheticScenes("train", 64, image_size=8, caption_noise=0.5)
    assert batch[scene_truth.SCENE].shape == (16, 3, 4) and batch[scene_truth.SCENE].dtype == np.int8
    assert batch[scene_truth.CAPTION].shape == (16, 4, 4) and batch[scene_truth.SWAPPED].dtype == bool
    for row, index in enumerate(batch["index"]):
        truth = src.truth(int(index))
        for key in scene_truth.FIELDS:
            np.testing.assert_array_equal(batch[key][row], truth[key])


def test_heldout_seed_is_its_own():
    from softalign.data.sources import build_source
    cfg = pipeline.default_data_config()
    cfg.update(train_size=10, heldout_size=10)
    base = build_source(cfg, "heldout")
    cfg.seed = 3
    assert build_source(cfg, "heldout").caption(0) != base.caption(0)      # -1: follows data.seed
    cfg.heldout_seed = 0
    assert build_source(cfg, "heldout").caption(0) == base.caption(0)      # pinned, whatever data.seed is
    assert build_source(cfg, "train").seed == 3
