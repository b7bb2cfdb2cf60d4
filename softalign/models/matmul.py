"""Matmuls for mixed precision: inputs in the compute dtype, products accumulated and returned in float32.

On bfloat16 hardware paths (TPU/GPU tensor cores, CPUs with AVX512-BF16/AMX) a bf16 x bf16 -> f32 product runs at
about twice the float32 rate. Autodiff of such a product would feed the float32 cotangent into the backward
matmuls and so run two thirds of the FLOPs in float32; :func:`einsum` casts the cotangent to the compute dtype
first, so the backward pass gets the same speed-up (what AMP does). With float32 compute it is a plain einsum.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


def einsum(spec: str, a: jax.Array, b: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """``jnp.einsum(spec, a, b)`` with a and b cast to ``dtype`` and a float32 result (and float32 gradients for
    float32 inputs). ``spec`` is a two-operand ``'ab,bc->ac'`` style spec; every index of an operand must appear
    in the other operand or the output (true of matmuls and attention)."""
    if jnp.dtype(dtype) == jnp.float32:
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return _mixed_einsum(spec, jnp.dtype(dtype), a, b)


def _grad_specs(spec: str) -> tuple[str, str]:
    inputs, out = spec.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    return f"{out},{rhs}->{lhs}", f"{out},{lhs}->{rhs}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mixed_einsum(spec: str, dtype: Any, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def _fwd(spec, dtype, a, b):
    a_c, b_c = a.astype(dtype), b.astype(dtype)  # residuals in the compute dtype: half the activation memory
    out = jnp.einsum(spec, a_c, b_c, preferred_element_type=jnp.float32)
    return out, (a_c, b_c, jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))


def _bwd(spec, dtype, res, g):
    a_c, b_c, a_proto, b_proto = res
    spec_a, spec_b = _grad_specs(spec)
    g_c = g.astype(dtype)
    da = jnp.einsum(spec_a, g_c, b_c, preferred_element_type=jnp.float32)
    db = jnp.einsum(spec_b, g_c, a_c, preferred_element_type=jnp.float32)
    return da.astype(a_proto.dtype), db.astype(b_proto.dtype)


_mixed_einsum.defvjp(_fwd, _bwd)
