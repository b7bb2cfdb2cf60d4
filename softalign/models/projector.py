"""The precomputed-text tower (``model.text.kind='precomputed'``): an MLP from frozen text embeddings to the joint
space, FLAME's projector over LLM features or LiT's head over a locked text model's outputs.

``(..., D_in) -> (prod(...), embed_dim)``: leading axes are flattened row-major, so a batch's (B, K, D_in) facets
come out record-major (row i*K + k is facet k of record i), as ``multi_positive_sigmoid`` reads them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from softalign.models.layers import Dense, get_activation, layer_norm


class TextProjector(nn.Module):
    """LayerNorm -> Dense(hidden) -> activation -> Dense(embed_dim); ``hidden=0``: LayerNorm -> Dense(embed_dim)."""

    input_dim: int
    embed_dim: int
    hidden: int = 0
    activation: str = "gelu"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, embeddings: jax.Array) -> jax.Array:
        if embeddings.shape[-1] != self.input_dim:
            raise ValueError(f"text embeddings have width {embeddings.shape[-1]}, model.text.input_dim is "
                             f"{self.input_dim}")
        x = embeddings.reshape(-1, self.input_dim).astype(jnp.float32)
        x = layer_norm("ln_in")(x)
        if self.hidden > 0:
            x = get_activation(self.activation)(Dense(self.hidden, dtype=self.dtype, name="hidden")(x))
        return Dense(self.embed_dim, dtype=self.dtype, name="out")(x).astype(jnp.float32)
