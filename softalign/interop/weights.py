"""Import and export open_clip / OpenAI CLIP weights: ``state_dict_to_params`` and ``params_to_state_dict``.

softalign's modules mirror open_clip's layout (see softalign/models/layers.py), so the mapping is a rename plus
transposes: torch ``Linear`` weights (out, in) become Flax ``kernel`` (in, out), the patch conv (out, in, kh, kw)
becomes (kh, kw, in, out), and ``visual.proj`` / ``text_projection`` are already (in, out). Every leaf is checked
against the softalign model's shape; missing or unused checkpoint keys are an error that lists them.

Activation: the weights do not say which one a model was trained with. open_clip's ``ViT-B-16``/``ViT-B-32`` use
exact GELU (``model.activation='gelu'``, the softalign default). OpenAI's original CLIP weights (open_clip's
``ViT-B-32-quickgelu``, ``pretrained='openai'``) use QuickGELU: set ``--config.model.activation=quick_gelu``.
Attention heads are not in the weights either; ``infer_model_config`` assumes CLIP's 64-wide heads.
The text tower pools where ``tokens == model.text.eot_id``; open_clip pools at the largest token id, which is the
same position with CLIP's tokenizer (``<|endoftext|>`` = 49407 is its last id).

CLI (``--input`` .safetensors/.pt/.bin -> softalign params .msgpack, or back with ``--export``):

    python -m softalign.convert --input=open_clip_model.safetensors --output=params.msgpack
    python -m softalign.convert --export --input=params.msgpack --output=open_clip_model.safetensors
    python -m softalign.convert --export --config=configs/vitb16.py --workdir=RUN --output=model.safetensors
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from softalign import workdir as run_files
from softalign.config.errors import ConfigError
from softalign.interop.weight_files import Params, StateDict, flatten, load_params, load_state_dict, unflatten
from softalign.models import abstract_params
from softalign.models.presets import list_presets, model_preset

# Non-parameter entries some checkpoints carry: OpenAI's TorchScript archives store these ints as tensors, and
# older open_clip versions saved the text tower's causal mask as a persistent buffer.
IGNORED_KEYS = ("attn_mask", "input_resolution", "context_length", "vocab_size")

# (softalign path, open_clip key, transform) for the leaves outside the transformer blocks.
_TOP = (
    ("vision/patch_embed/kernel", "visual.conv1.weight", "conv"),
    ("vision/cls_token", "visual.class_embedding", ""),
    ("vision/pos_embedding", "visual.positional_embedding", ""),
    ("vision/ln_pre/scale", "visual.ln_pre.weight", ""),
    ("vision/ln_pre/bias", "visual.ln_pre.bias", ""),
    ("vision/ln_post/scale", "visual.ln_post.weight", ""),
    ("vision/ln_post/bias", "visual.ln_post.bias", ""),
    ("vision/proj/kernel", "visual.proj", ""),
    ("text/token_embedding/embedding", "token_embedding.weight", ""),
    ("text/pos_embedding", "positional_embedding", ""),
    ("text/ln_final/scale", "ln_final.weight", ""),
    ("text/ln_final/bias", "ln_final.bias", ""),
    ("text/proj/kernel", "text_projection", ""),
    ("logit_scale", "logit_scale", ""),
)
# The same inside each residual block: softalign's resblocks_N/... <- open_clip's resblocks.N.... .
_BLOCK = (
    ("attn/in_proj/kernel", "attn.in_proj_weight", "T"),
    ("attn/in_proj/bias", "attn.in_proj_bias", ""),
    ("attn/out_proj/kernel", "attn.out_proj.weight", "T"),
    ("attn/out_proj/bias", "attn.out_proj.bias", ""),
    ("ln_1/scale", "ln_1.weight", ""),
    ("ln_1/bias", "ln_1.bias", ""),
    ("ln_2/scale", "ln_2.weight", ""),
    ("ln_2/bias", "ln_2.bias", ""),
    ("mlp/c_fc/kernel", "mlp.c_fc.weight", "T"),
    ("mlp/c_fc/bias", "mlp.c_fc.bias", ""),
    ("mlp/c_proj/kernel", "mlp.c_proj.weight", "T"),
    ("mlp/c_proj/bias", "mlp.c_proj.bias", ""),
)
_TO_FLAX = {"": lambda a: a, "T": lambda a: a.T, "conv": lambda a: a.transpose(2, 3, 1, 0)}
_TO_TORCH = {"": lambda a: a, "T": lambda a: a.T, "conv": lambda a: a.transpose(3, 2, 0, 1)}
_TOWERS = (("vision", "visual."), ("text", ""))


def key_map(vision_depth: int, text_depth: int) -> list[tuple[str, str, str]]:
    """Every (softalign path, open_clip key, transform) for a model of these depths (unscanned layout)."""
    rows = list(_TOP)
    for (tower, prefix), depth in zip(_TOWERS, (vision_depth, text_depth)):
        for i in range(depth):
            rows += [(f"{tower}/transformer/resblocks_{i}/{path}", f"{prefix}transformer.resblocks.{i}.{key}", t)
                     for path, key, t in _BLOCK]
    return rows


def _depth(sd: StateDict, prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}transformer\.resblocks\.(\d+)\.")
    found = [int(m.group(1)) for m in map(pattern.match, sd) if m]
    return max(found) + 1 if found else 0


def is_ignored(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in IGNORED_KEYS


def infer_model_config(sd: StateDict) -> ml_collections.ConfigDict:
    """The softalign ``model`` section a state dict implies (heads assume width // 64; eot = the last vocab id).

    Use it to check a config against a checkpoint, or to build a model for one without knowing its name.
    """
    need = [k for k in ("visual.conv1.weight", "visual.positional_embedding", "visual.transformer.resblocks.0."
                        "mlp.c_fc.weight", "token_embedding.weight", "positional_embedding", "ln_final.weight",
                        "text_projection", "transformer.resblocks.0.mlp.c_fc.weight") if k not in sd]
    if need:
        raise ValueError(f"not an open_clip / OpenAI CLIP ViT state dict: missing {need}")
    cfg = model_preset("ViT-B/16")
    v, t = cfg.vision, cfg.text
    v.width, _, _, v.patch_size = (int(n) for n in sd["visual.conv1.weight"].shape)
    v.image_size = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)) * v.patch_size
    t.vocab_size, t.width = (int(n) for n in sd["token_embedding.weight"].shape)
    t.context_length, t.eot_id = int(sd["positional_embedding"].shape[0]), t.vocab_size - 1
    for tower, prefix in ((v, "visual."), (t, "")):
        tower.depth, tower.num_heads = _depth(sd, prefix), max(tower.width // 64, 1)
        tower.mlp_ratio = sd[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / tower.width
    cfg.embed_dim = int(sd["text_projection"].shape[1])
    return cfg


# (config key, what a message calls it) for everything the weights determine.
_CHECKED = (("vision.patch_size", "patch"), ("vision.image_size", "image size"), ("vision.width", "vision width"),
            ("vision.depth", "vision depth"), ("vision.mlp_ratio", "vision mlp_ratio"),
            ("text.width", "text width"), ("text.depth", "text depth"), ("text.mlp_ratio", "text mlp_ratio"),
            ("text.vocab_size", "vocab"), ("text.context_length", "context"), ("embed_dim", "embed dim"))


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def describe(cfg: ml_collections.ConfigDict) -> str:
    """The preset name a model section matches in every weight-determined field (e.g. 'ViT-B/32'), else a summary."""
    for name in list_presets():
        if all(_get(model_preset(name), k) == _get(cfg, k) for k, _ in _CHECKED):
            return name
    v, t = cfg.vision, cfg.text
    return (f"a CLIP ViT (vision {v.width}x{v.depth} patch {v.patch_size} at {v.image_size} px, "
            f"text {t.width}x{t.depth}, embed {cfg.embed_dim})")


def check_model_config(sd: StateDict, model_config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming each architecture field where ``model_config`` disagrees with the checkpoint."""
    found = infer_model_config(sd)
    name = describe(found)
    errors = [f"checkpoint is {name} ({label} {_get(found, key)}) but model.{key}={_get(model_config, key)}"
              for key, label in _CHECKED if _get(found, key) != _get(model_config, key)]
    if model_config.vision.pool != "cls":
        errors.append(f"open_clip's ViT pools the class token but model.vision.pool={model_config.vision.pool!r}")
    if errors:
        raise ValueError("; ".join(errors))


def param_shapes(model_config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
    """``{'vision/ln_pre/scale': shape, ...}`` of the model ``model_config`` builds (abstract: nothing allocated)."""
    shapes = abstract_params(model_config)
    return {path: tuple(leaf.shape) for path, leaf in flatten(shapes).items()}


def _limited(keys: Sequence[str], n: int = 12) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _stack_blocks(flat: dict[str, np.ndarray], depths: dict[str, int]) -> dict[str, np.ndarray]:
    """resblocks_N/x -> resblocks/block/x with a leading depth axis (the ``model.scan_layers=True`` layout)."""
    out = {k: v for k, v in flat.items() if "/resblocks_" not in k}
    for tower, depth in depths.items():
        for path, _, _ in _BLOCK:
            layers = [flat[f"{tower}/transformer/resblocks_{i}/{path}"] for i in range(depth)]
            out[f"{tower}/transformer/resblocks/block/{path}"] = np.stack(layers)
    return out


def _unstack_blocks(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of ``_stack_blocks`` (a no-op for unscanned params)."""
    out = {}
    for path, leaf in flat.items():
        tower, sep, rest = path.partition("/transformer/resblocks/block/")
        if not sep:
            out[path] = leaf
            continue
        for i, layer in enumerate(leaf):
            out[f"{tower}/transformer/resblocks_{i}/{rest}"] = layer
    return out


def state_dict_to_params(sd: StateDict, model_config: ml_collections.ConfigDict) -> Params:
    """open_clip / OpenAI CLIP state dict -> softalign params (numpy float32) for the model ``model_config`` builds.

    Checks the architecture first, then every key and every converted shape; errors name the keys.
    """
    sd = {k: v for k, v in sd.items() if not is_ignored(k)}
    check_model_config(sd, model_config)
    rows = key_map(model_config.vision.depth, model_config.text.depth)
    missing = [key for _, key, _ in rows if key not in sd]
    unused = set(sd) - {key for _, key, _ in rows}
    if missing or unused:
        raise ValueError(f"checkpoint keys do not match a softalign CLIP: missing [{_limited(missing)}]; "
                         f"unused [{_limited(list(unused))}]")
    flat = {path: np.asarray(_TO_FLAX[t](np.asarray(sd[key], np.float32))) for path, key, t in rows}
    if model_config.get("scan_layers", False):
        flat = _stack_blocks(flat, {"vision": model_config.vision.depth, "text": model_config.text.depth})
    expected = param_shapes(model_config)
    check_shapes(flat, expected, {path: key for path, key, _ in rows})
    return unflatten(flat)


def check_shapes(flat: dict[str, Any], expected: dict[str, tuple[int, ...]],
                 sources: dict[str, str] | None = None) -> None:
    """Raises ValueError unless ``flat`` has exactly ``expected``'s paths and shapes (names both sides' keys)."""
    sources = sources or {}
    errors = [f"{sources.get(p, p)} -> {p}: shape {tuple(np.shape(flat[p]))}, the model expects {s}"
              for p, s in expected.items() if p in flat and tuple(np.shape(flat[p])) != s]
    missing, extra = set(expected) - set(flat), set(flat) - set(expected)
    if missing:
        errors.append(f"params missing [{_limited(list(missing))}]")
    if extra:
        errors.append(f"params the model lacks [{_limited(list(extra))}]")
    if errors:
        raise ValueError("; ".join(errors))


def params_to_state_dict(params: Any) -> StateDict:
    """softalign params (scanned or not) -> open_clip state dict of float32 numpy arrays (the exact inverse)."""
    flat = _unstack_blocks({k: np.asarray(v, np.float32) for k, v in flatten(params).items()})
    depths = [len({k.split("/")[2] for k in flat if k.startswith(f"{tower}/transformer/")}) for tower, _ in _TOWERS]
    rows = key_map(*depths)
    missing = [path for path, _, _ in rows if path not in flat]
    unused = set(flat) - {path for path, _, _ in rows}
    if missing or unused:
        raise ValueError(f"params do not map to open_clip (only pool='cls' ViT CLIPs do): missing "
                         f"[{_limited(missing)}]; unmapped [{_limited(list(unused))}]")
    return {key: np.array(_TO_TORCH[t](flat[path]), order="C") for path, key, t in rows}


def load_pretrained(path: str, model_config: ml_collections.ConfigDict) -> Params:
    """Weights for ``model_config``'s model from an open_clip/OpenAI checkpoint or a softalign ``.msgpack``."""
    if str(path).endswith(".msgpack"):
        params = load_params(path)
        flat = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
        check_shapes(flat, param_shapes(model_config))
        return unflatten(flat)
    return state_dict_to_params(load_state_dict(path), model_config)


def init_from_params(config: Any, workdir: str) -> Params | None:
    """``config.init_from``'s weights for a run starting fresh in ``workdir``; None when ``init_from`` is empty
    or the workdir already holds a checkpoint (a resumed run continues from its own weights)."""
    if not config.get("init_from", ""):
        return None
    checkpoints = epath.Path(run_files.checkpoints_dir(workdir))
    if checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir()):
        return None
    try:
        return load_pretrained(config.init_from, config.model)
    except (OSError, ValueError) as e:
        raise ConfigError(f"init_from={config.init_from}: {e}") from None
