"""The CLIP model: ViT image tower + causal text tower + a learned temperature, in flax.linen.

``model.text.kind='precomputed'`` replaces the text transformer by `projector.TextProjector`, an MLP over
precomputed text embeddings (``model.text.input_dim`` wide; FLAME / LiT): the text input is then float
(n, [K,] input_dim) instead of tokens, and K facets per record come out record-major (n*K, embed_dim).

Why linen: its parameters are one plain nested-dict pytree, which the jitted train step, the sharding rules
and Orbax checkpoints handle directly, with no module-state objects to split or merge.
Parameters stay float32; `model.dtype` ('auto' | 'float32' | 'bfloat16'; softalign.models.precision) only sets
the matmul compute dtype.
Outputs are always float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from softalign.models import views
from softalign.models.layers import get_activation
from softalign.models.precision import compute_dtype
from softalign.models.projector import TextProjector
from softalign.models.text import TextTransformer
from softalign.models.vit import MASK_TYPES, POOL_TYPES, VisionTransformer

TEXT_KINDS = ("transformer", "precomputed")


def text_kind(model_config: ml_collections.ConfigDict) -> str:
    """'transformer' (tokens in) or 'precomputed' (text embeddings in): ``model.text.kind``."""
    return str(model_config.text.get("kind", "transformer"))


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Float32 unit-norm rows; eps guards against a zero vector."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class CLIP(nn.Module):
    """Two-tower contrastive model configured by the `model` section of the experiment config.

    Top-level params: ``vision`` (VisionTransformer), ``text`` (TextTransformer), ``logit_scale`` (scalar,
    the log of the inverse temperature).
    """

    config: ml_collections.ConfigDict | ml_collections.FrozenConfigDict

    def __post_init__(self) -> None:
        # Freeze and check the config: a hashable module can be a static jit argument or be cloned by Flax.
        if not isinstance(self.config, ml_collections.FrozenConfigDict):
            object.__setattr__(self, "config", ml_collections.FrozenConfigDict(self.config))
        validate_model_config(self.config)
        super().__post_init__()

    def setup(self) -> None:
        cfg = self.config
        dtype = compute_dtype(cfg.dtype)
        remat = bool(cfg.get("remat", False))
        scan = bool(cfg.get("scan_layers", False))
        v, t = cfg.vision, cfg.text
        self.vision = VisionTransformer(
            image_size=v.image_size,
            patch_size=v.patch_size,
            width=v.width,
            depth=v.depth,
            num_heads=v.num_heads,
            embed_dim=cfg.embed_dim,
            mlp_ratio=v.mlp_ratio,
            pool=v.pool,
            activation=cfg.activation,
            dtype=dtype,
            remat=remat,
            scan=scan,
            mask_ratio=float(v.get("mask_ratio", 0.0)),
            mask=v.get("mask", "random"),
        )
        if text_kind(cfg) == "precomputed":
            self.text = TextProjector(input_dim=int(t.input_dim), embed_dim=cfg.embed_dim,
                                      hidden=int(t.get("projector_hidden", 0)), activation=cfg.activation, dtype=dtype)
        else:
            self.text = self._text_transformer(t, dtype, remat, scan)
        init_value = math.log(cfg.get("logit_scale_init", 1.0 / 0.07))
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(init_value), (), jnp.float32
        )

    def _text_transformer(self, t: Any, dtype: Any, remat: bool, scan: bool) -> TextTransformer:
        cfg = self.config
        return TextTransformer(
            vocab_size=t.vocab_size,
            context_length=t.context_length,
            width=t.width,
            depth=t.depth,
            num_heads=t.num_heads,
            embed_dim=cfg.embed_dim,
            eot_id=t.eot_id,
            mlp_ratio=t.mlp_ratio,
            activation=cfg.activation,
            dtype=dtype,
            remat=remat,
            scan=scan,
        )

    def encode_image(self, images: jax.Array) -> jax.Array:
        """Images (n, H, W, 3) float -> L2-normalised float32 (n, embed_dim)."""
        return l2_normalize(self.vision(images))

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """Tokens (n, context_length) int -> L2-normalised float32 (n, embed_dim); a precomputed-text model takes
        text embeddings (n, [K,] input_dim) float -> (n*K, embed_dim) instead."""
        return l2_normalize(self.text(tokens))

    def image_features(self, images: jax.Array, train: bool = False,
                       keep: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """``(L2-normalised embedding (n, embed_dim), pooled feature (n, width))``, float32; ``train``/``keep`` as
        in ``__call__``."""
        emb, pooled = self.vision(images, train=train, keep=keep, return_pooled=True)
        return l2_normalize(emb), pooled

    def clamped_logit_scale(self) -> jax.Array:
        """exp(logit_scale) clamped to logit_scale_max, float32 scalar."""
        max_scale = self.config.get("logit_scale_max", 100.0)
        return jnp.minimum(jnp.exp(self.logit_scale), jnp.float32(max_scale))

    def __call__(self, images: jax.Array, tokens: jax.Array, train: bool = False,
                 keep: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Returns (image_emb, text_emb, logit_scale): unit-norm float32 (n, d) twice and a scalar. ``train=True``
        masks image patches when ``vision.mask_ratio > 0`` (pass ``rngs={"mask": key}``); the step's student only.
        ``keep`` (n, k): the image patches to keep (A-CLIP's attentive mask)."""
        masked = train or keep is not None
        image_emb = l2_normalize(self.vision(images, train=train, keep=keep)) if masked else self.encode_image(images)
        return image_emb, self.encode_text(tokens), self.clamped_logit_scale()


def build_model(model_config: ml_collections.ConfigDict) -> CLIP:
    """Build CLIP from the `model` config section; the config is validated and frozen (a copy) first."""
    return CLIP(model_config)


def example_inputs(model_config: ml_collections.ConfigDict, batch: int = 1) -> tuple[jax.Array, jax.Array]:
    """Zero ``(images, tokens)`` of the shapes the model takes (text embeddings (batch, input_dim) for a
    precomputed-text model): what ``init`` and shape inference need."""
    size = model_config.vision.image_size
    images = jnp.zeros((batch, size, size, 3), jnp.float32)
    if text_kind(model_config) == "precomputed":
        return images, jnp.zeros((batch, int(model_config.text.input_dim)), jnp.float32)
    return images, jnp.zeros((batch, model_config.text.context_length), jnp.int32)


def abstract_params(model_config: ml_collections.ConfigDict) -> Any:
    """The params pytree of ``build_model(model_config)`` as ``ShapeDtypeStruct``s (nothing is allocated)."""
    model = build_model(model_config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs(model_config))["params"])


def validate_model_config(cfg: ml_collections.ConfigDict) -> None:
    """Raise ValueError for shape/option errors before anything is traced or compiled."""
    compute_dtype(cfg.dtype)
    get_activation(cfg.activation)
    v, t = cfg.vision, cfg.text
    if v.image_size % v.patch_size != 0:
        raise ValueError(
            f"model.vision.image_size ({v.image_size}) must be divisible by patch_size ({v.patch_size})."
        )
    if v.pool not in POOL_TYPES:
        raise ValueError(f"model.vision.pool must be one of {POOL_TYPES}, got {v.pool!r}.")
    if v.get("mask", "random") not in MASK_TYPES:
        raise ValueError(f"model.vision.mask must be one of {MASK_TYPES}, got {v.mask!r}.")
    if v.get("mask", "random") == "attentive" and v.pool != "cls":
        raise ValueError("model.vision.mask='attentive' reads the [cls] token's attention: it needs pool='cls'.")
    ratio, patches = float(v.get("mask_ratio", 0.0)), (v.image_size // v.patch_size) ** 2
    block, grid = int(v.get("mask_block", 1)), v.image_size // v.patch_size
    if block < 1 or grid % block or (v.get("mask", "random") == "attentive"
                                     and int((grid // block) ** 2 * (1.0 - ratio)) < 1):
        raise ValueError(f"model.vision.mask_block={block} must divide the {grid} x {grid} patch grid and leave at "
                         f"least one block kept at mask_ratio={ratio}.")
    if not 0.0 <= ratio < 1.0 or int(patches * (1.0 - ratio)) < 1:
        raise ValueError(f"model.vision.mask_ratio={ratio} must be in [0, 1) and keep at least one of the "
                         f"{patches} patches.")
    unmask = int(v.get("unmask_last_steps", 0))
    if unmask < 0 or (unmask > 0 and not (ratio > 0 and v.get("mask", "random") == "random")):
        raise ValueError(f"model.vision.unmask_last_steps={unmask} must be >= 0, and > 0 only with FLIP's random "
                         "mask (mask='random', mask_ratio > 0)")
    kind = text_kind(cfg)
    if kind not in TEXT_KINDS:
        raise ValueError(f"model.text.kind must be one of {TEXT_KINDS}, got {kind!r}.")
    if kind == "precomputed" and (int(t.get("input_dim", 0)) < 1 or int(t.get("projector_hidden", 0)) < 0):
        raise ValueError(f"model.text.kind='precomputed' needs model.text.input_dim >= 1 (got {t.get('input_dim')}) "
                         f"and projector_hidden >= 0 (got {t.get('projector_hidden')}).")
    for name, tower in (("vision", v), ("text", t)):
        if tower.width % tower.num_heads != 0:
            raise ValueError(
                f"model.{name}.width ({tower.width}) must be divisible by num_heads ({tower.num_heads})."
            )
    if not 0 <= t.eot_id < t.vocab_size:
        raise ValueError(f"model.text.eot_id ({t.eot_id}) must lie in [0, vocab_size={t.vocab_size}).")


def cls_attention(model: CLIP, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The image tower run on the full ``images`` with ``params`` (a teacher's): its [cls] -> patch attention
    averaged over heads and layers, float32 (n, g, g) on the g x g patch grid, and its pooled feature (n, width)."""
    (_, pooled), state = model.apply({"params": params}, images, method=model.image_features,
                                     mutable=["intermediates"])
    found = [x for path, x in jax.tree_util.tree_leaves_with_path(state["intermediates"])
             if "vision" in jax.tree_util.keystr(path) and "cls_attention" in jax.tree_util.keystr(path)]
    n, length = images.shape[0], found[0].shape[-1]
    attention = jnp.concatenate([x.reshape(-1, n, length) for x in found]).mean(axis=0)[:, 1:]
    grid = model.config.vision.image_size // model.config.vision.patch_size
    return jax.lax.stop_gradient(attention).reshape(n, grid, grid), jax.lax.stop_gradient(pooled)


def attentive_keep(model: CLIP, params: Any, images: jax.Array, ratio: float) -> jax.Array:
    """A-CLIP's mask on the full images: (n, int(L (1 - ratio))) indices of the patches the teacher's [cls] token
    attends to most (``cls_attention``; ``model.vision.mask_block`` > 1: whole blocks, see ``views.block_keep``)."""
    attention, _ = cls_attention(model, params, images)
    return views.block_keep(attention, ratio, int(model.config.vision.get("mask_block", 1)))
