"""A-CLIP's online views and attentive masks as array functions: random crop boxes, one separable bilinear
resampler for both the crops and the teacher's attention map, and block-wise top-k patch selection.

A box is ``(top, left, height, width)`` as fractions of the image side. Resampling a grid through a box reads it
at the box's output-cell centres, so the image crop and its attention map stay aligned patch for patch (A-CLIP's
``get_mask`` does the same with interpolate-crop-interpolate in pixels).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def random_boxes(key: jax.Array, shape: tuple[int, ...], scale: tuple[float, float],
                 ratio: tuple[float, float]) -> jax.Array:
    """RandomResizedCrop's boxes, float32 ``shape + (4,)``: area fraction ``~ U(scale)``, aspect ``w/h`` log-uniform
    in ``ratio``, sides clipped to the image, position uniform. (torchvision redraws a box that does not fit up to
    10 times, then falls back to a centre crop; clipping keeps one draw per box and the same range of crops.)"""
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    area = jax.random.uniform(k_area, shape, minval=scale[0], maxval=scale[1])
    aspect = jnp.exp(jax.random.uniform(k_ratio, shape, minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
    height = jnp.minimum(jnp.sqrt(area / aspect), 1.0)
    width = jnp.minimum(jnp.sqrt(area * aspect), 1.0)
    top = jax.random.uniform(k_top, shape) * (1.0 - height)
    left = jax.random.uniform(k_left, shape) * (1.0 - width)
    return jnp.stack([top, left, height, width], axis=-1).astype(jnp.float32)


def _interpolation_matrix(start: jax.Array, length: jax.Array, size_in: int, size_out: int) -> jax.Array:
    """(n, size_out, size_in) bilinear weights: output cell a reads the input at ``(start + (a + ½)/size_out ·
    length) · size_in − ½`` (input cell centres at integers), clamped to the edge cells."""
    centres = (jnp.arange(size_out, dtype=jnp.float32) + 0.5) / size_out
    pos = (start[:, None] + centres[None] * length[:, None]) * size_in - 0.5
    pos = jnp.clip(pos, 0.0, size_in - 1.0)
    low = jnp.floor(pos)
    frac = pos - low
    low = low.astype(jnp.int32)
    high = jnp.minimum(low + 1, size_in - 1)
    return (jax.nn.one_hot(low, size_in) * (1.0 - frac)[..., None] + jax.nn.one_hot(high, size_in) * frac[..., None])


def resample(x: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
    """Bilinear crop-and-resize of ``x`` (n, H, W, C) through ``boxes`` (n, 4) to (n, size, size, C), float32.
    Separable, as two batched matmuls; the box (0, 0, 1, 1) at ``size == H == W`` returns ``x`` (to float32
    rounding of the sample positions)."""
    rows = _interpolation_matrix(boxes[:, 0], boxes[:, 2], x.shape[1], size)
    cols = _interpolation_matrix(boxes[:, 1], boxes[:, 3], x.shape[2], size)
    return jnp.einsum("nah,nhwc,nbw->nabc", rows, x.astype(jnp.float32), cols,
                      precision=jax.lax.Precision.HIGHEST)


def block_keep(attention: jax.Array, ratio: float, block: int = 1) -> jax.Array:
    """A-CLIP's block-wise attentive mask: ``attention`` (n, g, g) over the patch grid -> int32 (n, k·block²)
    indices (row-major, sorted) of the patches in the ``k = int((g/block)² (1 − ratio))`` blocks of ``block x block``
    patches with the highest mean attention. ``block=1`` keeps the top patches themselves."""
    n, g = attention.shape[0], attention.shape[1]
    if g % block or attention.shape[2] != g:
        raise ValueError(f"the {g} x {attention.shape[2]} patch grid does not split into {block} x {block} blocks")
    nb = g // block
    keep = int(nb * nb * (1.0 - ratio))
    if keep < 1:
        raise ValueError(f"mask_ratio={ratio} keeps no block of the {nb * nb}")
    scores = attention.reshape(n, nb, block, nb, block).mean(axis=(2, 4)).reshape(n, nb * nb)
    top = jax.lax.top_k(jax.lax.stop_gradient(scores), keep)[1]
    if block == 1:
        return top.astype(jnp.int32)
    top = jnp.sort(top, axis=1)
    by, bx = top // nb, top % nb  # (n, keep) block coordinates -> the block's patches, row-major within it
    dy, dx = jnp.divmod(jnp.arange(block * block), block)
    rows = by[:, :, None] * block + dy[None, None]
    cols = bx[:, :, None] * block + dx[None, None]
    return (rows * g + cols).reshape(n, keep * block * block).astype(jnp.int32)


def attentive_views(key: jax.Array, images: jax.Array, attention: jax.Array, num_views: int,
                    scale: tuple[float, float], ratio: tuple[float, float], mask_ratio: float,
                    block: int = 1) -> tuple[jax.Array, jax.Array]:
    """A-CLIP's online views: ``num_views`` random resized crops of each image (n, S, S, C), stacked view-minor
    (row ``V·i + v``), each with the patches to keep from the full image's ``attention`` (n, g, g) read through
    the same box. Returns ``(views (n·V, S, S, C) in the images' dtype, keep (n·V, k))``."""
    n, size, grid = images.shape[0], images.shape[1], attention.shape[1]
    boxes = random_boxes(key, (n, num_views), scale, ratio).reshape(n * num_views, 4)
    crops = resample(jnp.repeat(images, num_views, axis=0), boxes, size).astype(images.dtype)
    maps = resample(jnp.repeat(attention, num_views, axis=0)[..., None], boxes, grid)[..., 0]
    return crops, block_keep(maps, mask_ratio, block)
