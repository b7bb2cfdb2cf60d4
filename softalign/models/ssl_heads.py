"""A-CLIP's self-supervised heads on the image tower's pooled [cls] feature: SimCLR's projector and BYOL's
projector and predictor (microsoft/A-CLIP ``models.py``: ``image_mlp``, ``im_proj_byol``, ``im_pred_byol``).

Their batch norms always use the statistics of the batch they see, as the reference's do in training: the heads
are only ever run inside the train step (the EMA teacher's copy too), so no running averages exist or are saved.
Inside a sharded ``jit`` the mean over the batch is the global batch's (XLA adds the all-reduce), so 8 devices equal
1. Parameters and compute are float32: the heads are small next to the towers.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchStatNorm(nn.Module):
    """Batch norm with the current batch's mean and (biased) variance over axis 0, eps 1e-5 as PyTorch's."""

    affine: bool = True
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        mean = jnp.mean(x, axis=0, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=0, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.param("scale", nn.initializers.ones, (x.shape[-1],)) + self.param(
                "bias", nn.initializers.zeros, (x.shape[-1],))
        return y


class MLPHead(nn.Module):
    """``layers - 1`` x (Dense(hidden) -> batch norm -> ReLU), then Dense(out). SimCLR's: 3 layers with biases;
    BYOL's projector and predictor: 2 layers without (A-CLIP's ``_build_mlp`` and ``_build_mlp_byol``)."""

    hidden: int
    out: int
    layers: int
    use_bias: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        for i in range(self.layers - 1):
            x = nn.Dense(self.hidden, use_bias=self.use_bias, name=f"dense{i}")(x)
            x = nn.relu(BatchStatNorm(name=f"norm{i}")(x))
        return nn.Dense(self.out, use_bias=self.use_bias, name=f"dense{self.layers - 1}")(x)


class AClipHeads(nn.Module):
    """The heads A-CLIP adds: ``simclr`` (pooled -> hidden -> hidden -> dim) and, with ``byol``, BYOL's
    ``byol_proj`` (pooled -> hidden -> dim) and ``byol_pred`` (dim -> hidden -> dim)."""

    hidden: int
    dim: int
    simclr: bool = True
    byol: bool = True

    def setup(self) -> None:
        if self.simclr:
            self.simclr_head = MLPHead(self.hidden, self.dim, 3, use_bias=True)
        if self.byol:
            self.byol_proj = MLPHead(self.hidden, self.dim, 2, use_bias=False)
            self.byol_pred = MLPHead(self.hidden, self.dim, 2, use_bias=False)

    def __call__(self, pooled: jax.Array) -> dict[str, jax.Array]:
        """Every built head's output on the student's pooled features: ``simclr`` and ``byol`` (predictor on
        projector), each (n, dim)."""
        out = {}
        if self.simclr:
            out["simclr"] = self.simclr_head(pooled)
        if self.byol:
            out["byol"] = self.byol_pred(self.byol_proj(pooled))
        return out

    def byol_target(self, pooled: jax.Array) -> jax.Array:
        """The projector alone: with the EMA teacher's copy of these params, BYOL's target on its pooled features."""
        return self.byol_proj(pooled)
