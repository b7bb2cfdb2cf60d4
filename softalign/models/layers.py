"""Pre-LN transformer building blocks shared by the image and text towers (OpenAI CLIP / open_clip layout).

Mixed precision: matmul inputs are cast to the compute ``dtype`` and products accumulate in float32
(``softalign.models.matmul``, also in the backward pass); LayerNorm, GELU, the softmax and the residual stream stay
float32, so bfloat16 compute only rounds matmul inputs. Parameters are always float32.

Parameter names mirror open_clip so a weight importer is a rename plus transposes:
``ln_1``, ``attn/in_proj`` (fused q|k|v), ``attn/out_proj``, ``ln_2``, ``mlp/c_fc``, ``mlp/c_proj``.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from softalign.models import matmul

Dtype = Any

LN_EPS = 1e-5  # torch.nn.LayerNorm default, as in open_clip.


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
    """Erf-based GELU, x * (1 + erf(x / sqrt 2)) / 2: torch.nn.GELU()'s formula (open_clip's non-quickgelu models).

    Written with erf rather than ``jax.nn.gelu``'s erfc form: XLA's erfc takes a branchy exp-based path that cost
    8% of a CPU train step, while erf is one polynomial; for x << 0, where the two differ, both are ~0.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * (2.0**-0.5)))


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": exact_gelu,
    "quick_gelu": quick_gelu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Look up an activation by config name ('gelu' or 'quick_gelu')."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}.")
    return _ACTIVATIONS[name]


class Dense(nn.Module):
    """y = x @ kernel + bias with float32 params; the matmul takes inputs in ``dtype`` and accumulates and returns
    float32 (``preferred_element_type``), so bfloat16 compute costs no precision outside the multiply.

    Same parameter names and shapes as ``nn.Dense`` (``kernel`` (in, out), ``bias`` (out,)).
    """

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        y = matmul.einsum("...k,kn->...n", x, kernel, self.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        return y


@jax.custom_vjp
def _normalize(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32 (two-pass variance, as torch)."""
    return _normalize_fwd(x, scale, bias)[0]


def _normalize_fwd(x, scale, bias):
    x_proto = jnp.zeros((0,), x.dtype)  # the input's dtype, for its cotangent
    x = x.astype(jnp.float32)
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + LN_EPS)
    x_hat = centred * rstd
    return x_hat * scale + bias, (x_hat, rstd, scale, x_proto)


def _normalize_bwd(res, g):
    # The textbook LayerNorm backward: two row means instead of autodiff's chain through mean and variance.
    x_hat, rstd, scale, x_proto = res
    g = g.astype(jnp.float32)
    gs = g * scale
    dx = rstd * (gs - jnp.mean(gs, axis=-1, keepdims=True) - x_hat * jnp.mean(gs * x_hat, axis=-1, keepdims=True))
    lead = tuple(range(g.ndim - 1))
    return dx.astype(x_proto.dtype), jnp.sum(g * x_hat, axis=lead), jnp.sum(g, axis=lead)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


class LayerNorm(nn.Module):
    """float32 LayerNorm over the last axis with torch's epsilon and a closed-form backward pass; params ``scale``
    and ``bias``, as ``nn.LayerNorm``. Autodiff of flax's version left XLA:CPU a backward of materialised
    broadcasts; this one made the bf16 step 11-12% faster at 224 px, tiny and B/16 shapes (docs/performance.md)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones_init(), (x.shape[-1],), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (x.shape[-1],), jnp.float32)
        return _normalize(x, scale, bias)


def layer_norm(name: str) -> LayerNorm:
    """float32 LayerNorm with torch's epsilon; params `scale` and `bias`."""
    return LayerNorm(name=name)


def causal_mask(length: int) -> jax.Array:
    """Boolean (length, length) mask, True where query i may attend to key j (j <= i)."""
    return jnp.tril(jnp.ones((length, length), dtype=bool))


class MultiHeadSelfAttention(nn.Module):
    """Self-attention with one fused q|k|v projection (like torch nn.MultiheadAttention's in_proj)."""

    width: int
    num_heads: int
    causal: bool = False
    dtype: Dtype = jnp.float32
    qkv_std: float = 0.02
    out_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.width % self.num_heads != 0:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}.")
        length = x.shape[1]
        head_dim = self.width // self.num_heads
        # The projections write and read head-major (b, h, l, d) directly: no head transposes, and the backward
        # pass joins dq, dk, dv with one concatenate instead of three pads and adds (docs/performance.md).
        q, k, v = _HeadProjection(self.width, self.num_heads, self.dtype, self.qkv_std, name="in_proj")(x)
        q = q * jnp.asarray(head_dim**-0.5, q.dtype)
        logits = matmul.einsum("bhqd,bhkd->bhqk", q, k, self.dtype)  # float32 scores and softmax
        if self.causal:
            logits = jnp.where(causal_mask(length), logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        # A-CLIP reads token 0's attention, averaged over heads; a no-op unless 'intermediates' is mutable
        self.sow("intermediates", "cls_attention", jnp.mean(probs[:, :, 0], axis=1))
        probs = probs.astype(self.dtype)
        out = matmul.einsum("bhqk,bhkd->bhqd", probs, v, self.dtype)
        return _HeadOutput(self.width, self.num_heads, self.dtype, self.out_std, name="out_proj")(out)


class _HeadProjection(nn.Module):
    """x (b, l, width) -> q, k, v, each (b, h, l, d) in the compute dtype: one matmul with the fused in_proj kernel
    (width, 3 * width) viewed as (width, 3, h, d). Its output features are [q | k | v], each (heads, head_dim):
    torch's in_proj_weight layout, so kernel = in_proj_weight.T."""

    width: int
    num_heads: int
    dtype: Dtype
    std: float

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        h, d = self.num_heads, self.width // self.num_heads
        kernel = self.param("kernel", nn.initializers.normal(self.std), (self.width, 3 * self.width), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (3 * self.width,), jnp.float32)
        out = matmul.einsum("blc,cthd->tbhld", x, kernel.reshape(self.width, 3, h, d), self.dtype)
        out = (out + bias.reshape(3, 1, h, 1, d)).astype(self.dtype)
        return tuple(t[0] for t in jax.lax.split(out, (1, 1, 1), axis=0))


class _HeadOutput(nn.Module):
    """Head-major (b, h, l, d) -> (b, l, width) in float32: out_proj's (width, width) kernel viewed as (h, d, width)
    contracts heads and head_dim at once."""

    width: int
    num_heads: int
    dtype: Dtype
    std: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h, d = self.num_heads, self.width // self.num_heads
        kernel = self.param("kernel", nn.initializers.normal(self.std), (self.width, self.width), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.width,), jnp.float32)
        return matmul.einsum("bhld,hdc->blc", x, kernel.reshape(h, d, self.width), self.dtype) + bias


class MLP(nn.Module):
    """Two-layer feed-forward block: Dense(width*mlp_ratio) -> activation -> Dense(width)."""

    width: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    dtype: Dtype = jnp.float32
    fc_std: float = 0.02
    proj_std: float = 0.02

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = int(self.width * self.mlp_ratio)
        h = Dense(
            hidden,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.normal(self.fc_std),
            name="c_fc",
        )(x)
        h = get_activation(self.activation)(h)
        return Dense(
            self.width,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=nn.initializers.normal(self.proj_std),
            name="c_proj",
        )(h)


class ResidualBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); the residual stream stays float32."""

    width: int
    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    causal: bool = False
    dtype: Dtype = jnp.float32
    depth: int = 12  # Of the whole stack; only scales the init of the output projections.

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # open_clip's init: attn std w^-0.5, residual-out std w^-0.5 (2*depth)^-0.5, fc std (2w)^-0.5.
        attn_std = self.width**-0.5
        proj_std = attn_std * (2 * self.depth) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        x = x.astype(jnp.float32)
        y = MultiHeadSelfAttention(
            self.width,
            self.num_heads,
            causal=self.causal,
            dtype=self.dtype,
            qkv_std=attn_std,
            out_std=proj_std,
            name="attn",
        )(layer_norm("ln_1")(x))
        x = x + y.astype(jnp.float32)
        y = MLP(
            self.width,
            mlp_ratio=self.mlp_ratio,
            activation=self.activation,
            dtype=self.dtype,
            fc_std=fc_std,
            proj_std=proj_std,
            name="mlp",
        )(layer_norm("ln_2")(x))
        return x + y.astype(jnp.float32)


class _ScannedBlock(nn.Module):
    """One residual block in ``nn.scan``'s carry form ``(x, _) -> (x, None)``."""

    kwargs: dict

    @nn.compact
    def __call__(self, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
        return ResidualBlock(**self.kwargs, name="block")(x), None


class Transformer(nn.Module):
    """A stack of `depth` residual blocks named resblocks_0 .. resblocks_{depth-1}.

    `remat=True` rematerialises each block's activations in the backward pass (less memory, ~1/3 more compute).
    `scan=True` runs one block under ``nn.scan`` with parameters stacked along a leading depth axis
    (``resblocks/block/...``): compile time stops growing with depth; the maths is the same.
    """

    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    activation: str = "gelu"
    causal: bool = False
    dtype: Dtype = jnp.float32
    remat: bool = False
    scan: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.scan:
            kwargs = dict(width=self.width, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                          activation=self.activation, causal=self.causal, dtype=self.dtype, depth=self.depth)
            body = nn.remat(_ScannedBlock) if self.remat else _ScannedBlock
            stack = nn.scan(body, variable_axes={"params": 0, "intermediates": 0}, split_rngs={"params": True},
                            length=self.depth)
            x, _ = stack(kwargs, name="resblocks")(x, None)
            return x
        block_cls = nn.remat(ResidualBlock) if self.remat else ResidualBlock
        for i in range(self.depth):
            x = block_cls(
                width=self.width,
                num_heads=self.num_heads,
                mlp_ratio=self.mlp_ratio,
                activation=self.activation,
                causal=self.causal,
                dtype=self.dtype,
                depth=self.depth,
                name=f"resblocks_{i}",
            )(x)
        return x
