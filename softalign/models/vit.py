"""Vision Transformer image tower (open_clip's VisionTransformer layout) producing unnormalised embeddings."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from softalign.models import matmul
from softalign.models.layers import Dense, Transformer, layer_norm

Dtype = Any

POOL_TYPES = ("cls", "gap")
MASK_TYPES = ("random", "attentive")  # FLIP's uniform draw; A-CLIP's teacher-attended patches (given as `keep`)


def keep_indices(key: jax.Array, n: int, num_patches: int, ratio: float) -> jax.Array:
    """FLIP's random mask: int32 (n, keep) patch indices, ``keep = int(num_patches * (1 - ratio))``, per row the
    first ``keep`` of ``argsort(uniform noise)`` (so each row keeps a uniformly random subset)."""
    keep = int(num_patches * (1.0 - ratio))
    noise = jax.random.uniform(key, (n, num_patches))
    return jnp.argsort(noise, axis=1)[:, :keep].astype(jnp.int32)


def gather_patches(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Rows ``idx`` (n, k) of the tokens ``x`` (n, L, w) -> (n, k, w), exact (a gather; its gradient a scatter-add).
    A one-hot einsum form was no faster on the demo model under jit on CPU (benchmarks/masking.py)."""
    return jnp.take_along_axis(x, idx[:, :, None], axis=1)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> width, bias-free: a stride-p conv computed as one matmul over flattened
    patches (XLA's CPU convolution is several times slower for this shape). ``kernel`` keeps the conv layout
    (p, p, C, width), so weights move to and from a conv (open_clip's ``conv1``) by a transpose.
    """

    patch_size: int
    width: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        n, h, w, c = images.shape
        p = self.patch_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.width), jnp.float32)
        patches = images.astype(self.dtype).reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(n, (h // p) * (w // p), p * p * c)
        return matmul.einsum("npk,kw->npw", patches, kernel.reshape(p * p * c, self.width), self.dtype)


class VisionTransformer(nn.Module):
    """Patchify (bias-free p x p projection) -> [cls] + positions -> ln_pre -> transformer -> ln_post -> pool -> proj.

    Input: float images (n, H, W, C), NHWC. Output: float32 (n, embed_dim), not normalised.
    Params: ``patch_embed/kernel`` (p, p, C, width), ``cls_token`` (width,) (pool='cls' only),
    ``pos_embedding`` (tokens, width), ``ln_pre``, ``transformer``, ``ln_post``, ``proj/kernel`` (width, embed_dim).
    """

    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    embed_dim: int
    mlp_ratio: float = 4.0
    pool: str = "cls"
    activation: str = "gelu"
    dtype: Dtype = jnp.float32
    remat: bool = False
    scan: bool = False
    mask_ratio: float = 0.0  # FLIP: share of patches dropped in training (train=True; needs the 'mask' rng)
    mask: str = "random"  # 'attentive': no draw here; the caller passes the patches to keep (A-CLIP)

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    def _check(self) -> None:
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})."
            )
        if self.pool not in POOL_TYPES:
            raise ValueError(f"Unknown vision pool {self.pool!r}; expected one of {POOL_TYPES}.")
        if not 0.0 <= self.mask_ratio < 1.0 or int(self.grid_size**2 * (1.0 - self.mask_ratio)) < 1:
            raise ValueError(f"model.vision.mask_ratio={self.mask_ratio} must be in [0, 1) and keep >= 1 patch.")

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, keep: jax.Array | None = None,
                 return_pooled: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
        """``train=True`` with ``mask_ratio > 0`` drops patches at random (FLIP), drawing from the 'mask' rng;
        ``keep`` (n, k) int: keep exactly those patches (A-CLIP). Otherwise (evaluation, teachers) every patch is
        kept and the code path is exactly the unmasked one. ``return_pooled``: also the pooled (n, width) feature
        before the projection (what A-CLIP's self-supervised heads read)."""
        self._check()
        if images.ndim != 4 or images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"Expected images of shape (n, {self.image_size}, {self.image_size}, C), got {images.shape}."
            )
        scale = self.width**-0.5
        n = images.shape[0]
        x = PatchEmbed(self.patch_size, self.width, dtype=self.dtype, name="patch_embed")(images)

        num_tokens = self.grid_size * self.grid_size
        if self.pool == "cls":
            cls = self.param("cls_token", nn.initializers.normal(scale), (self.width,), jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, self.width)), x], axis=1)
            num_tokens += 1
        pos = self.param("pos_embedding", nn.initializers.normal(scale), (num_tokens, self.width), jnp.float32)
        x = x + pos[None]
        if keep is not None or (train and self.mask_ratio > 0 and self.mask == "random"):
            lead = 1 if self.pool == "cls" else 0  # after the positions, as FLIP; the [cls] token is always kept
            if keep is None:
                keep = keep_indices(self.make_rng("mask"), n, self.grid_size**2, self.mask_ratio)
            x = jnp.concatenate([x[:, :lead], gather_patches(x[:, lead:], keep)], axis=1)

        x = layer_norm("ln_pre")(x)
        x = Transformer(
            width=self.width,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            activation=self.activation,
            causal=False,
            dtype=self.dtype,
            remat=self.remat,
            scan=self.scan,
            name="transformer",
        )(x)
        x = layer_norm("ln_post")(x)
        # open_clip applies ln_post to every token and pools afterwards; both orders agree for 'cls'.
        pooled = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
        out = Dense(
            self.embed_dim,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.normal(scale),
            name="proj",
        )(pooled)
        if return_pooled:
            return out.astype(jnp.float32), pooled.astype(jnp.float32)
        return out.astype(jnp.float32)
