"""TinyCLIP's manual weight inheritance (Wu et al., ICCV 2023): a smaller CLIP's params cut out of a larger one's.

Per tower, student block i takes teacher block ``i * k`` with ``k = d_t // d_s`` (layers 0, k, 2k, ...), and every
leaf keeps the leading slice of each axis (the first channels, the first MLP units, the first embedding dims).
The fused q|k|v projection is cut per head: viewed as ``(width_in, 3, heads, head_dim)`` it keeps the first
heads of each of q, k and v, so the two towers need the same head width (TinyCLIP: 64). Scalars (the logit scale)
are copied. Scanned (``model.scan_layers``) and unscanned layouts are accepted on either side.
"""

from __future__ import annotations

import re
from typing import Any

import ml_collections
import numpy as np
from flax import traverse_util

from softalign.models.clip import abstract_params

_LAYER = re.compile(r"^(vision|text)/transformer/resblocks_(\d+)/(.+)$")
_SCANNED = "/transformer/resblocks/block/"


def _flat(params: Any) -> dict[str, np.ndarray]:
    """``{'a/b/c': array}`` with scanned blocks unstacked to ``resblocks_i``."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
        tower, sep, rest = path.partition(_SCANNED)
        if sep:
            for i, layer in enumerate(np.asarray(leaf)):
                out[f"{tower}/transformer/resblocks_{i}/{rest}"] = layer
        else:
            out[path] = np.asarray(leaf)
    return out


def _stacked(flat: dict[str, np.ndarray], depths: dict[str, int]) -> dict[str, np.ndarray]:
    """The inverse of the unstacking in :func:`_flat`, for a student built with ``scan_layers=True``."""
    out = {k: v for k, v in flat.items() if not _LAYER.match(k)}
    subs = {m.group(3) for m in map(_LAYER.match, flat) if m}
    for tower, depth in depths.items():
        for sub in subs:
            out[f"{tower}{_SCANNED}{sub}"] = np.stack([flat[f"{tower}/transformer/resblocks_{i}/{sub}"]
                                                       for i in range(depth)])
    return out


def _leading(leaf: np.ndarray, shape: tuple[int, ...], path: str) -> np.ndarray:
    if leaf.ndim != len(shape) or any(s > t for s, t in zip(shape, leaf.shape)):
        raise ValueError(f"weight inheritance: {path} is {leaf.shape} in the teacher, the student needs {shape} "
                         "(every axis must be at most the teacher's)")
    return leaf[tuple(slice(0, s) for s in shape)]


def _qkv(leaf: np.ndarray, shape: tuple[int, ...], head_dim: int) -> np.ndarray:
    """The first heads of q, k and v: kernel (w_in, 3 * H * hd) or bias (3 * H * hd,)."""
    heads_s = shape[-1] // (3 * head_dim)
    heads_t = leaf.shape[-1] // (3 * head_dim)
    lead = leaf.shape[:-1]
    cut = leaf.reshape(lead + (3, heads_t, head_dim))[..., :, :heads_s, :]
    cut = cut[tuple(slice(0, s) for s in shape[:-1])]
    return cut.reshape(shape)


def _check_towers(teacher_cfg: Any, student_cfg: Any) -> dict[str, int]:
    """Layer stride per tower; raises for a deeper student, another head width, or another patch or image size."""
    strides = {}
    for name in ("vision", "text"):
        t, s = teacher_cfg[name], student_cfg[name]
        if not 1 <= s.depth <= t.depth:
            raise ValueError(f"weight inheritance: model.{name}.depth={s.depth} must be in [1, the teacher's "
                             f"{t.depth}]")
        if s.width // s.num_heads != t.width // t.num_heads:
            raise ValueError(f"weight inheritance keeps whole heads: model.{name} head width {s.width // s.num_heads}"
                             f" (width / num_heads) must equal the teacher's {t.width // t.num_heads}")
        strides[name] = t.depth // s.depth
    for key in ("patch_size", "image_size"):
        if student_cfg.vision[key] != teacher_cfg.vision[key]:
            raise ValueError(f"weight inheritance: model.vision.{key}={student_cfg.vision[key]} must equal the "
                             f"teacher's {teacher_cfg.vision[key]}")
    return strides


def layer_map(teacher_depth: int, student_depth: int) -> list[int]:
    """The teacher block each student block inherits: ``range(0, d_s * k, k)``, ``k = d_t // d_s``."""
    k = teacher_depth // student_depth
    return list(range(0, student_depth * k, k))


def inherit(teacher_params: Any, teacher_model_config: Any, student_model_config: Any) -> dict[str, Any]:
    """Student params (nested dict of float32 numpy arrays) inherited from ``teacher_params`` (module docstring).

    Both configs are ``model`` sections; only the model's own leaves are read (``params['objective']`` is not)."""
    strides = _check_towers(teacher_model_config, student_model_config)
    teacher = {k: v for k, v in _flat(teacher_params).items() if not k.startswith("objective/")}
    unscanned = ml_collections.ConfigDict(student_model_config.to_dict())
    unscanned.scan_layers = False
    expected = traverse_util.flatten_dict(abstract_params(unscanned), sep="/")  # ShapeDtypeStructs, resblocks_i
    out = {}
    for path, want in expected.items():
        shape = tuple(want.shape)
        m = _LAYER.match(path)
        source = path
        if m:
            tower, i, sub = m.group(1), int(m.group(2)), m.group(3)
            source = f"{tower}/transformer/resblocks_{i * strides[tower]}/{sub}"
        if source not in teacher:
            raise ValueError(f"weight inheritance: the teacher has no {source} (for the student's {path})")
        leaf = teacher[source]
        if m and m.group(3).startswith("attn/in_proj/"):
            tower_cfg = student_model_config[m.group(1)]
            leaf = _qkv(leaf, shape, tower_cfg.width // tower_cfg.num_heads)
        else:
            leaf = _leading(leaf, shape, path)
        out[path] = np.array(leaf, np.float32)
    if student_model_config.get("scan_layers", False):
        out = _stacked(out, {"vision": student_model_config.vision.depth, "text": student_model_config.text.depth})
    return traverse_util.unflatten_dict(out, sep="/")
