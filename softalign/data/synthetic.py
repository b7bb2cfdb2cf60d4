"""Procedurally generated image-caption scenes: the project's embedded, download-free dataset.

Each record is a few coloured shapes on a dark noisy background with a caption drawn from a small
grammar. Captions are deliberately partial (size, position or colour are sometimes left out, objects are
listed in random order and occasionally dropped) so the image-text relation is many-to-many, like web data.
Everything is derived from ``np.random.default_rng((seed, split_id, index))``: random access is O(1), no files.
Each record also carries its exact ground truth under ``'truth'`` (`scene_truth`: the scene's objects, what its
caption states, and under caption noise whether and from where it was swapped), which the pipeline batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from softalign.data import scene_truth

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "orange", "purple", "cyan", "white")
_RGB = np.array(
    [[225, 35, 35], [35, 200, 55], [45, 85, 240], [240, 225, 35],
     [250, 135, 15], [155, 55, 215], [35, 215, 225], [245, 245, 245]], dtype=np.float32)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "ring")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "center", "right",
                              "bottom left", "bottom", "bottom right")
NUMBERS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPLITS: dict[str, int] = {"train": 0, "heldout": 1}
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position")

_SIZE_FRACTION = (0.24, 0.42)      # object radius unit as a fraction of a grid cell
_JITTER = 0.08                     # centre jitter, fraction of a cell
_NOISE_STREAM = 7919               # extra seed word for the caption-noise stream
_COLOR_STREAM = 7927               # extra seed word for colours drawn with `color_weights`

_SHAPE_WORDS = {"circle": ("circle", "circle", "disk"), "square": ("square", "square", "block"),
                "triangle": ("triangle",), "diamond": ("diamond",),
                "cross": ("cross", "cross", "plus sign"), "ring": ("ring", "ring", "donut")}
_SIZE_WORDS = {"small": ("small", "small", "little"), "large": ("large", "large", "big")}
_POSITION_PHRASES = {
    "top left": ("in the top left", "in the top left corner", "at the top left"),
    "top": ("at the top", "near the top", "in the top middle"),
    "top right": ("in the top right", "in the top right corner", "at the top right"),
    "left": ("on the left", "at the left", "on the left side"),
    "center": ("in the center", "in the middle", "at the center"),
    "right": ("on the right", "at the right", "on the right side"),
    "bottom left": ("in the bottom left", "in the bottom left corner", "at the bottom left"),
    "bottom": ("at the bottom", "near the bottom", "in the bottom middle"),
    "bottom right": ("in the bottom right", "in the bottom right corner", "at the bottom right"),
}
_ONE_TEMPLATES = ("{}", "a picture of {}", "there is {}.", "an image of {}", "{} on a dark background",
                  "one shape: {}", "a dark background with {}")
_MANY_TEMPLATES = ("{}", "a picture of {}", "there is {}.", "an image with {}", "{} on a dark background",
                   "a dark background with {}", "{n} shapes: {}")
_ONE_COUNT = "one shape: {}"       # the one-object template that states the count


@dataclasses.dataclass(frozen=True)
class _Object:
    color: int
    shape: int
    size: int
    position: int
    offset: tuple[float, float]   # jitter (dx, dy) in cell units
    rgb: tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class _Scene:
    objects: tuple[_Object, ...]
    background: tuple[float, float, float]


def _sample_scene(rng: np.random.Generator, max_objects: int, single_object: bool,
                  color_cdf: np.ndarray | None = None, color_seed: tuple[int, ...] = ()) -> _Scene:
    """Draws the scene parameters (no pixels) from `rng`; vectorised draws keep this cheap. With `color_cdf`, the
    colours are redrawn from that distribution on their own stream (`color_seed`); every other draw is unchanged."""
    n = 1 if single_object else int(rng.integers(1, max_objects + 1))
    cells = rng.permutation(len(POSITIONS))[:n]
    attrs = rng.integers(0, (len(COLORS), len(SHAPES), len(SIZES)), size=(n, 3))
    if color_cdf is not None:
        attrs[:, 0] = np.searchsorted(color_cdf, np.random.default_rng(color_seed).random(n), side="right")
    rgbs = np.clip(_RGB[attrs[:, 0]] + rng.integers(-18, 19, size=(n, 3)), 0, 255)
    offsets = rng.uniform(-_JITTER, _JITTER, size=(n, 2))
    objects = tuple(
        _Object(color=int(a[0]), shape=int(a[1]), size=int(a[2]), position=int(c),
                offset=(float(o[0]), float(o[1])), rgb=(float(v[0]), float(v[1]), float(v[2])))
        for a, c, o, v in zip(attrs, cells, offsets, rgbs))
    background = rng.uniform(0.0, 70.0, size=3)
    return _Scene(objects, (float(background[0]), float(background[1]), float(background[2])))


def _shape_sdf(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (approximate, in radius units) to a unit-sized shape; y points down."""
    ax, ay = np.abs(x), np.abs(y)
    if shape == "circle":
        return np.hypot(x, y) - 0.9
    if shape == "square":
        return np.maximum(ax, ay) - 0.78
    if shape == "diamond":
        return (ax + ay - 1.05) * np.float32(0.7071)
    if shape == "triangle":   # apex up, circumradius 1.2
        return np.maximum(y, np.maximum(0.866 * x - 0.5 * y, -0.866 * x - 0.5 * y)) - 0.6
    if shape == "cross":
        return np.minimum(np.maximum(ax - 0.95, ay - 0.3), np.maximum(ax - 0.3, ay - 0.95))
    if shape == "ring":
        return np.abs(np.hypot(x, y) - 0.7) - 0.25
    raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: _Scene, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Rasterises `scene` with anti-aliased edges plus mild uniform noise from `rng` to uint8 (S, S, 3)."""
    s = image_size
    cell = s / 3.0
    coords = np.arange(s, dtype=np.float32) + 0.5
    img = np.empty((s, s, 3), np.float32)
    img[:] = scene.background
    for obj in scene.objects:
        row, col = divmod(obj.position, 3)
        cx = (col + 0.5 + obj.offset[0]) * cell
        cy = (row + 0.5 + obj.offset[1]) * cell
        r = _SIZE_FRACTION[obj.size] * cell
        x0, x1 = max(int(cx - 1.25 * r) - 1, 0), min(int(cx + 1.25 * r) + 2, s)   # bounding box
        y0, y1 = max(int(cy - 1.25 * r) - 1, 0), min(int(cy + 1.25 * r) + 2, s)
        sdf = _shape_sdf(SHAPES[obj.shape], (coords[None, x0:x1] - cx) / r,
                         (coords[y0:y1, None] - cy) / r)
        alpha = np.clip(0.5 - sdf * r, 0.0, 1.0)[..., None]
        patch = img[y0:y1, x0:x1]
        patch += alpha * (np.asarray(obj.rgb, np.float32) - patch)
    noise = rng.random(img.shape, np.float32)
    img += noise * 18.0 - 8.5                    # uniform in [-8.5, 9.5): sd ~5, rounds on the cast
    return np.clip(img, 0.0, 255.0, out=img).astype(np.uint8)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclasses.dataclass(frozen=True)
class Phrase:
    """One object's noun phrase as the grammar drew it: the words written (None: left out) and what they state."""

    obj: int                       # which object of the scene it describes
    stated: tuple[int, int, int, int]   # (color, shape, size, position) it states; -1 where left out
    size: str | None
    color: str | None
    noun: str                      # a shape word, or "shape"/"object" for a generic phrase
    position: str | None

    def text(self) -> str:
        words = [w for w in (self.size, self.color) if w] + [self.noun]
        phrase = _article(words[0]) + " " + " ".join(words)
        return phrase + " " + self.position if self.position else phrase


@dataclasses.dataclass(frozen=True)
class CaptionParts:
    """A caption as drawn from the grammar: its phrases in caption order, the template and its casing.
    ``count`` is the object count the template states ("three shapes: ...", "one shape: ..."), or -1."""

    phrases: tuple[Phrase, ...]
    template: str
    num_objects: int
    capitalise: bool

    @property
    def count(self) -> int:
        return self.num_objects if ("{n}" in self.template or self.template == _ONE_COUNT) else -1

    def text(self) -> str:
        caption = self.template.replace("{n}", NUMBERS[self.num_objects - 1]).format(
            _join([p.text() for p in self.phrases]))
        return caption[0].upper() + caption[1:] if self.capitalise else caption


def _object_phrase(obj: _Object, index: int, rng: np.random.Generator) -> Phrase:
    """One noun phrase; attributes are dropped at random so captions stay partial."""
    use_size, use_pos, use_color = rng.random(3) < (0.55, 0.65, 0.9)
    generic = rng.random() < 0.12
    if generic and not (use_size or use_pos or use_color):
        use_color = True
    size = _pick(rng, _SIZE_WORDS[SIZES[obj.size]]) if use_size else None
    noun = _pick(rng, ("shape", "object")) if generic else _pick(rng, _SHAPE_WORDS[SHAPES[obj.shape]])
    position = _pick(rng, _POSITION_PHRASES[POSITIONS[obj.position]]) if use_pos else None
    stated = (obj.color if use_color else -1, -1 if generic else obj.shape, obj.size if use_size else -1,
              obj.position if use_pos else -1)
    return Phrase(index, stated, size, COLORS[obj.color] if use_color else None, noun, position)


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption_parts(scene: _Scene, rng: np.random.Generator) -> CaptionParts:
    """Samples a caption for `scene` from the grammar, as parts (``.text()`` is the caption)."""
    n = len(scene.objects)
    order = rng.permutation(n)
    phrases = [_object_phrase(scene.objects[k], int(k), rng) for k in order]
    templates = _ONE_TEMPLATES if n == 1 else _MANY_TEMPLATES
    template = _pick(rng, templates)
    if n > 1 and "{n}" not in template and rng.random() < 0.15:
        phrases = phrases[:-1]            # web captions often miss something
    return CaptionParts(tuple(phrases), template, n, bool(rng.random() < 0.3))


def make_caption(scene: _Scene, rng: np.random.Generator) -> str:
    """Samples a caption for `scene` from the grammar."""
    return caption_parts(scene, rng).text()


def restate(parts: CaptionParts, phrase: int, attribute: str, value: int, rng: np.random.Generator) -> CaptionParts:
    """`parts` with phrase `phrase` stating `value` for `attribute` (a grammar word for it, drawn from `rng`):
    how the compositional probe builds a caption that differs from the true one in one attribute."""
    p = parts.phrases[phrase]
    a = ATTRIBUTES.index(attribute)
    stated = p.stated[:a] + (int(value),) + p.stated[a + 1:]
    if attribute == "color":
        words = dict(color=COLORS[value])
    elif attribute == "shape":
        words = dict(noun=_pick(rng, _SHAPE_WORDS[SHAPES[value]]))
    elif attribute == "size":
        words = dict(size=_pick(rng, _SIZE_WORDS[SIZES[value]]))
    else:
        words = dict(position=_pick(rng, _POSITION_PHRASES[POSITIONS[value]]))
    new = dataclasses.replace(p, stated=stated, **words)
    return dataclasses.replace(parts, phrases=parts.phrases[:phrase] + (new,) + parts.phrases[phrase + 1:])


def scene_array(scene: _Scene, max_objects: int) -> np.ndarray:
    """The scene's objects as a `scene_truth` scene array (max_objects, 4) int8."""
    return scene_truth.encode_scene([(o.color, o.shape, o.size, o.position) for o in scene.objects], max_objects)


def caption_array(parts: CaptionParts, max_objects: int) -> np.ndarray:
    """What the caption states, as a `scene_truth` caption array (max_objects + 1, 4) int8."""
    return scene_truth.encode_caption([p.stated for p in parts.phrases], max_objects, parts.count)


def attribute_classnames(attr: str) -> list[str]:
    """Class names for a labelled attribute ('color', 'shape', 'size', 'position', 'num_objects')."""
    table = {"color": COLORS, "shape": SHAPES, "size": SIZES, "position": POSITIONS,
             "num_objects": NUMBERS}
    if attr not in table:
        raise ValueError(f"unknown attribute {attr!r}; known: {sorted(table)}")
    return list(table[attr])


def attribute_prompts(attr: str) -> list[str]:
    """One in-grammar zero-shot prompt per class of `attr` (index i <-> label i)."""
    names = attribute_classnames(attr)
    if attr == "color":
        return [f"{_article(c)} {c} shape" for c in names]
    if attr == "shape":
        return [f"{_article(s)} {s}" for s in names]
    if attr == "size":
        return [f"a {s} shape" for s in names]
    if attr == "position":
        return [f"a shape {_POSITION_PHRASES[p][0]}" for p in names]
    return [f"{n} shapes" for n in names]


class SyntheticScenes:
    """Grain random-access source of procedurally generated (image, caption) scenes.

    Record i of a split is a pure function of (seed, split, i, image_size, max_objects,
    single_object, caption_noise, color_weights); 'train' and 'heldout' use different seed streams. `color_weights`
    (one weight per entry of `COLORS`; empty: uniform) sets how often each colour occurs; nothing else changes.
    """

    def __init__(self, split: str = "train", num_examples: int = 10_000, image_size: int = 32,
                 seed: int = 0, max_objects: int = 3, caption_noise: float = 0.0,
                 single_object: bool = False, color_weights: tuple[float, ...] = ()):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {sorted(SPLITS)}")
        if not 1 <= max_objects <= len(POSITIONS):
            raise ValueError(f"max_objects must be in [1, {len(POSITIONS)}], got {max_objects}")
        if not 0.0 <= caption_noise <= 1.0:
            raise ValueError(f"caption_noise must be in [0, 1], got {caption_noise}")
        if num_examples < 1 or image_size < 8 or seed < 0:
            raise ValueError("need num_examples >= 1, image_size >= 8 and seed >= 0")
        self.split, self.split_id = split, SPLITS[split]
        self.num_examples, self.image_size, self.seed = int(num_examples), int(image_size), int(seed)
        self.max_objects, self.caption_noise = int(max_objects), float(caption_noise)
        self.single_object = bool(single_object)
        self.color_weights, self._color_cdf = color_distribution(color_weights)

    def __len__(self) -> int:
        return self.num_examples

    def _scene_and_caption(self, index: int) -> tuple[_Scene, str, np.random.Generator]:
        """Scene, clean caption and the record's rng (positioned for rendering), in that draw order."""
        scene, parts, rng = self.scene_and_parts(index)
        return scene, parts.text(), rng

    def scene_and_parts(self, index: int) -> tuple[_Scene, CaptionParts, np.random.Generator]:
        """Record `index`'s scene, its clean caption as parts, and the rng positioned for rendering."""
        rng = np.random.default_rng((self.seed, self.split_id, index))
        scene = _sample_scene(rng, self.max_objects, self.single_object, self._color_cdf,
                              (self.seed, self.split_id, index, _COLOR_STREAM))
        return scene, caption_parts(scene, rng), rng

    def truth(self, index: int) -> dict[str, np.ndarray]:
        """Record `index`'s ground truth (`scene_truth.FIELDS`) without rendering: its scene, what its (possibly
        swapped) caption states, whether it was swapped, and whose scene the caption describes."""
        index = self._check_index(index)
        scene, parts, _ = self.scene_and_parts(index)
        partner = self._swap_partner(index)
        if partner is not None:
            parts = self.scene_and_parts(partner)[1]
        return self._truth(index, scene, parts, partner)

    def _truth(self, index: int, scene: _Scene, parts: CaptionParts, partner: int | None) -> dict[str, np.ndarray]:
        return {scene_truth.SCENE: scene_array(scene, self.max_objects),
                scene_truth.CAPTION: caption_array(parts, self.max_objects),
                scene_truth.SWAPPED: np.bool_(partner is not None),
                scene_truth.CAPTION_FROM: np.int32(index if partner is None else partner)}

    def _swap_partner(self, index: int) -> int | None:
        """Index whose caption replaces this record's caption, or None (depends only on seed/index)."""
        if self.caption_noise <= 0.0 or self.num_examples < 2:
            return None
        rng = np.random.default_rng((self.seed, self.split_id, index, _NOISE_STREAM))
        if rng.random() >= self.caption_noise:
            return None
        partner = int(rng.integers(self.num_examples - 1))
        return partner + (partner >= index)

    def _check_index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.num_examples
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {len(self)} records")
        return index

    def caption(self, index: int) -> str:
        """The (possibly swapped) caption of record `index`, without rendering the image."""
        index = self._check_index(index)
        partner = self._swap_partner(index)
        return self._scene_and_caption(index if partner is None else partner)[1]

    def captions_of(self, index: int) -> list[str]:
        """``[caption(index)]``: what `noise.captions_of` reads (tokenizer fits, caption counts), without rendering."""
        return [self.caption(index)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = self._check_index(index)
        scene, parts, rng = self.scene_and_parts(index)
        partner = self._swap_partner(index)
        if partner is not None:
            parts = self.scene_and_parts(partner)[1]
        first = scene.objects[0]
        labels = {"color": first.color, "shape": first.shape, "size": first.size,
                  "position": first.position, "num_objects": len(scene.objects)}
        return {"image": render_scene(scene, self.image_size, rng), "caption": parts.text(), "index": index,
                "labels": labels, "caption_swapped": partner is not None,
                "truth": self._truth(index, scene, parts, partner)}  # scene_truth.FIELDS

    def __repr__(self) -> str:
        return (f"SyntheticScenes(split={self.split!r}, num_examples={self.num_examples}, "
                f"image_size={self.image_size}, seed={self.seed}, max_objects={self.max_objects}, "
                f"caption_noise={self.caption_noise}, single_object={self.single_object}"
                + (f", color_weights={self.color_weights}" if self.color_weights else "") + ")")

    def describe(self) -> str:
        """One-line human summary (no rendering)."""
        objs = "1 object" if self.single_object else f"1-{self.max_objects} objects"
        return (f"synthetic/{self.split}: {self.num_examples} scenes at {self.image_size}px, {objs}, "
                f"{len(COLORS)} colours x {len(SHAPES)} shapes x {len(SIZES)} sizes x "
                f"{len(POSITIONS)} positions, caption_noise={self.caption_noise:g}"
                + (f", colour weights {'/'.join(f'{w:g}' for w in self.color_weights)}" if self.color_weights else ""))


def color_distribution(weights: Any) -> tuple[tuple[float, ...], np.ndarray | None]:
    """``(weights, cumulative probabilities)`` for `SyntheticScenes.color_weights` (``((), None)``: uniform)."""
    weights = tuple(float(w) for w in (weights or ()))
    if not weights:
        return (), None
    if len(weights) != len(COLORS):
        raise ValueError(f"data.color_weights needs one weight per colour ({len(COLORS)}: {', '.join(COLORS)}), "
                         f"got {len(weights)}")
    w = np.asarray(weights, np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"data.color_weights must be finite, non-negative and not all zero, got {weights}")
    cdf = np.cumsum(w) / w.sum()
    cdf[np.flatnonzero(w)[-1]:] = 1.0   # no rounding gap above the last colour that can occur
    return weights, cdf


def caption_corpus(num: int, seed: int = 0, max_objects: int = 3) -> list[str]:
    """`num` training-split captions (no images) for fitting a tokenizer."""
    source = SyntheticScenes("train", num, seed=seed, max_objects=max_objects)
    return [source._scene_and_caption(i)[1] for i in range(num)]
