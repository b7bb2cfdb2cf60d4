"""Causal text Transformer tower (open_clip's text encoder layout) producing unnormalised embeddings."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from softalign.models.layers import Dense, Transformer, layer_norm

Dtype = Any


def eot_positions(tokens: jax.Array, eot_id: int) -> jax.Array:
    """Index of the first `eot_id` in each row of int tokens (n, L); the last position if a row has none.

    The causal mask makes the feature there a summary of the caption up to and including EOT.
    """
    is_eot = tokens == eot_id
    first = jnp.argmax(is_eot, axis=-1)
    return jnp.where(jnp.any(is_eot, axis=-1), first, tokens.shape[-1] - 1)


class TextTransformer(nn.Module):
    """token_embedding + pos_embedding -> causal transformer -> ln_final -> pool at EOT -> proj.

    Input: int tokens (n, context_length). Output: float32 (n, embed_dim), not normalised.
    Params: ``token_embedding/embedding`` (vocab, width), ``pos_embedding`` (context_length, width),
    ``transformer``, ``ln_final``, ``proj/kernel`` (width, embed_dim).
    """

    vocab_size: int
    context_length: int
    width: int
    depth: int
    num_heads: int
    embed_dim: int
    eot_id: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    dtype: Dtype = jnp.float32
    remat: bool = False
    scan: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"Expected tokens of shape (n, {self.context_length}), got {tokens.shape}.")
        x = nn.Embed(
            self.vocab_size,
            self.width,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            embedding_init=nn.initializers.normal(0.02),
            name="token_embedding",
        )(tokens)
        pos = self.param(
            "pos_embedding", nn.initializers.normal(0.01), (self.context_length, self.width), jnp.float32
        )
        x = x + pos[None]
        x = Transformer(
            width=self.width,
            depth=self.depth,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            activation=self.activation,
            causal=True,
            dtype=self.dtype,
            remat=self.remat,
            scan=self.scan,
            name="transformer",
        )(x)
        x = layer_norm("ln_final")(x)
        idx = eot_positions(tokens, self.eot_id)
        pooled = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
        out = Dense(
            self.embed_dim,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.normal(self.width**-0.5),
            name="proj",
        )(pooled)
        return out.astype(jnp.float32)
