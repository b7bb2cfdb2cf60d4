"""The mixed-precision matmul (bf16 inputs, f32 accumulation, bf16 backward) and the CPU-speed rewrites of the
model (patch embedding as a matmul, erf GELU) against their plain definitions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softalign.models import matmul
from softalign.models.layers import exact_gelu
from softalign.models.vit import PatchEmbed

BF16 = jnp.bfloat16


def _rand(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _round(x):
    """x rounded to bfloat16 and back: the values a bf16 matmul sees."""
    return x.astype(BF16).astype(jnp.float32)


SPECS = [("...k,kn->...n", (4, 5, 24), (24, 16)),
         ("bhqd,bhkd->bhqk", (2, 3, 7, 8), (2, 3, 9, 8)),
         ("bhqk,bhkd->bhqd", (2, 3, 7, 9), (2, 3, 9, 8)),
         ("npk,kw->npw", (2, 4, 48), (48, 12))]


@pytest.mark.parametrize("spec,sa,sb", SPECS)
def test_float32_is_a_plain_einsum(spec, sa, sb):
    a, b = _rand(*sa), _rand(*sb, seed=1)
    np.testing.assert_array_equal(matmul.einsum(spec, a, b), jnp.einsum(spec, a, b))


@pytest.mark.parametrize("spec,sa,sb", SPECS)
def test_bfloat16_value_and_gradients(spec, sa, sb):
    """Forward: the f32-accumulated product of bf16-rounded inputs. Backward: the exact vjp formulas with the
    cotangent rounded to bf16 too (what AMP computes), returned in float32."""
    a, b = _rand(*sa), _rand(*sb, seed=1)
    out = jax.jit(lambda a, b: matmul.einsum(spec, a, b, BF16))(a, b)
    assert out.dtype == jnp.float32
    ref = np.einsum(spec, np.asarray(_round(a), np.float64), np.asarray(_round(b), np.float64))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)

    g = _rand(*out.shape, seed=2)
    _, vjp = jax.vjp(lambda a, b: matmul.einsum(spec, a, b, BF16), a, b)
    da, db = jax.jit(vjp)(g)
    assert da.dtype == db.dtype == jnp.float32
    ga, gb = _reference_grads(spec, a, b, g)
    np.testing.assert_allclose(da, ga, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, gb, rtol=1e-4, atol=1e-4)
    # And within bf16 rounding of the float32 gradients.
    fa, fb = jax.grad(lambda a, b: jnp.sum(g * jnp.einsum(spec, a, b)), (0, 1))(a, b)
    for got, want in ((da, fa), (db, fb)):
        assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 2e-2


def _reference_grads(spec, a, b, g):
    """float32 autodiff of the bf16-rounded problem (the product is linear in each input)."""
    return jax.grad(lambda a, b: jnp.sum(_round(g) * jnp.einsum(spec, a, b, precision="highest")), (0, 1))(
        _round(a), _round(b))


def test_patch_embed_equals_the_strided_conv():
    images, p, width = _rand(2, 16, 16, 3), 4, 8
    module = PatchEmbed(p, width)
    params = module.init(jax.random.key(0), images)
    kernel = params["params"]["kernel"]
    assert kernel.shape == (p, p, 3, width)  # the conv layout, so weights map to open_clip's conv1 by a transpose
    conv = jax.lax.conv_general_dilated(images, kernel, (p, p), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest")
    np.testing.assert_allclose(module.apply(params, images), conv.reshape(2, 16, width), rtol=1e-5, atol=1e-5)


def test_erf_gelu_equals_jax_gelu_value_and_gradient():
    x = jnp.linspace(-10.0, 10.0, 20001)
    np.testing.assert_allclose(exact_gelu(x), jax.nn.gelu(x, approximate=False), atol=2e-6)
    grad = jax.vmap(jax.grad(exact_gelu))(x)
    np.testing.assert_allclose(grad, jax.vmap(jax.grad(lambda t: jax.nn.gelu(t, approximate=False)))(x), atol=2e-6)
