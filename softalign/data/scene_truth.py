"""Exact many-to-many ground truth for the synthetic scenes: is a caption true of an image?

The generator (``synthetic.py``) knows every scene's objects and which attributes its caption states, so for any
caption and any scene the truth is decidable. Both are fixed-shape small int arrays (attribute order
``synthetic.ATTRIBUTES``: colour, shape, size, position):

  scene    int8 (K, 4): one row per object, ``[color, shape, size, position]``; rows past the scene's objects
           are ``EMPTY`` (-1). K = max_objects.
  caption  int8 (K + 1, 4): rows 0..K-1 are the objects the caption names, in caption order, each attribute the
           value stated or ``FREE`` (-1) when the caption leaves it out (synonyms are resolved by the generator:
           "disk" is a circle, "little" is small); unused rows are ``ABSENT`` (-2). Row K is ``[count, -1, -1, -1]``
           with ``count`` the number of objects the caption states ("three shapes: ...", "one shape: ...") or -1.

A caption is true of (``compatible`` with) a scene when its named objects can be matched to *distinct* objects of
the scene having every stated attribute, and the stated count (if any) equals the scene's object count. The
matching is decided with Hall's theorem (a matching exists iff every set of named objects can reach at least as
many scene objects), which vectorises over all caption x scene pairs: 2^K - 1 set checks, 7 for K = 3.
Functions take ``xp`` (numpy, or ``jax.numpy`` inside a jitted step).
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

FREE = -1       # caption: attribute not stated
ABSENT = -2     # caption: no object in this row
EMPTY = -1      # scene: no object in this row
NUM_ATTRIBUTES = 4

# Batch fields the synthetic source adds (train batches and records' ``truth`` dict); other sources have none.
SCENE = "truth_scene"                # int8 (B, K, 4)
CAPTION = "truth_caption"            # int8 (B, K + 1, 4): the spec of the caption the record actually carries
SWAPPED = "truth_swapped"            # bool (B,): caption noise swapped this record's caption
CAPTION_FROM = "truth_caption_from"  # int32 (B,): the split record whose scene the caption describes (itself
                                     # unless swapped; the split's own numbering, not a train_fraction subset's)
FIELDS = (SCENE, CAPTION, SWAPPED, CAPTION_FROM)


def encode_scene(objects: Sequence[Sequence[int]], max_objects: int) -> np.ndarray:
    """Scene array (K, 4) int8 from per-object ``(color, shape, size, position)``."""
    out = np.full((max_objects, NUM_ATTRIBUTES), EMPTY, np.int8)
    if len(objects) > max_objects:
        raise ValueError(f"{len(objects)} objects > max_objects={max_objects}")
    if len(objects):
        out[:len(objects)] = np.asarray(objects, np.int8)
    return out


def encode_caption(objects: Sequence[Sequence[int]], max_objects: int, count: int = -1) -> np.ndarray:
    """Caption array (K + 1, 4) int8 from the named objects' ``(color, shape, size, position)`` (FREE = not stated)
    and the stated object count (-1: none)."""
    out = np.full((max_objects + 1, NUM_ATTRIBUTES), ABSENT, np.int8)
    if len(objects) > max_objects:
        raise ValueError(f"{len(objects)} named objects > max_objects={max_objects}")
    if len(objects):
        out[:len(objects)] = np.asarray(objects, np.int8)
    out[max_objects] = (count, FREE, FREE, FREE)
    return out


def _subsets(k: int) -> list[tuple[bool, ...]]:
    """Every non-empty subset of k slots as a mask, smallest first."""
    masks = [m for m in itertools.product((False, True), repeat=k) if any(m)]
    return sorted(masks, key=sum)


def compatibility(captions: Any, scenes: Any, xp: Any = np) -> Any:
    """``out[s, c]``: caption ``c`` is true of scene ``s``. ``captions`` (C, K+1, 4), ``scenes`` (S, K', 4) ->
    bool (S, C): rows are scenes (images), as in the logits ``U V^T``. Exact (see the module docstring)."""
    objs, count = captions[:, :-1, :], captions[:, -1, 0]                  # (C, Kc, 4), (C,)
    named = objs[..., 0] != ABSENT                                         # (C, Kc)
    present = scenes[..., 0] != EMPTY                                      # (S, Ks)
    match = present[:, None, None, :] & named[None, :, :, None]            # (S, C, Kc, Ks): object k fits m
    for attr in range(NUM_ATTRIBUTES):
        want, have = objs[None, :, :, None, attr], scenes[:, None, None, :, attr]
        match = match & ((want == FREE) | (want == have))
    num_objects = xp.sum(present, axis=-1)                                 # (S,)
    ok = (count[None, :] < 0) | (count[None, :] == num_objects[:, None])
    for mask in _subsets(objs.shape[1]):                                   # Hall: |N(X)| >= |X| for every X
        slots = [k for k, on in enumerate(mask) if on]
        reach = match[:, :, slots[0], :]
        for k in slots[1:]:
            reach = reach | match[:, :, k, :]                              # (S, C, Ks): neighbours of X
        need = xp.sum(named[:, slots], axis=-1)                            # (C,): named objects in X
        ok = ok & (xp.sum(reach, axis=-1) >= need[None, :])
    return ok


def compatible(caption: Any, scene: Any) -> bool:
    """Whether one caption array (K+1, 4) is true of one scene array (K, 4)."""
    return bool(compatibility(np.asarray(caption)[None], np.asarray(scene)[None])[0, 0])


def batch_truth(batch: Any) -> tuple[Any, Any, Any] | None:
    """``(scene, caption, swapped)`` from a batch that carries the synthetic ground truth, else None."""
    if SCENE not in batch or CAPTION not in batch:
        return None
    return batch[SCENE], batch[CAPTION], batch.get(SWAPPED)
