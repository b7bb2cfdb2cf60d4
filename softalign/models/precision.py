"""The matmul compute dtype: ``model.dtype = 'auto'`` picks bfloat16 only where the hardware multiplies it fast.

bfloat16 matmul inputs run at about twice the float32 rate on TPUs, GPUs and CPUs with bf16 instructions (x86
AVX512-BF16 or AMX, ARM BF16). A CPU without them (an AVX2-only x86, say) emulates bf16 by converting to float32,
so there bfloat16 is slower than float32 and rounds for nothing (docs/performance.md measures both). 'auto' asks
the device: the user gets the faster dtype on every machine, and the resolved name is logged with the run.
:func:`configure_xla_cpu` then sets the XLA:CPU flags measured faster for that dtype.
"""

from __future__ import annotations

import functools
import os
from typing import Any, MutableMapping

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CHOICES = ("auto", *DTYPES)
# XLA:CPU's YNNPACK fusions off: float32 train steps 6-9% faster on an AVX2 AMD EPYC (64 px, 224 px, ViT-B/16) and
# up to 5% on an AMX Xeon, but they carry bf16 matmuls there (off, a bf16 matmul drops 7x). docs/performance.md.
YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
OPT_OUT = "SOFTALIGN_XLA_DEFAULTS"  # "0": leave XLA_FLAGS as the user set them
# /proc/cpuinfo flags (x86 "flags", ARM "Features") that mean bf16 matmuls run natively.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16", "sve_bf16", "i8mm_bf16"})


@functools.lru_cache(maxsize=None)
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this host's CPU reports a native bf16 dot-product instruction set."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    return bool(BF16_CPU_FLAGS & set(value.split()))
    except OSError:
        pass
    return False


def resolve_dtype_name(name: str, platform: str | None = None) -> str:
    """'float32' | 'bfloat16' for a config name; 'auto' is bfloat16 off-CPU and on CPUs with bf16 instructions."""
    if name not in CHOICES:
        raise ValueError(f"Unknown model dtype {name!r}; expected one of {list(CHOICES)}.")
    if name != "auto":
        return name
    platform = platform or jax.default_backend()
    return "bfloat16" if platform != "cpu" or cpu_has_bf16() else "float32"


def compute_dtype(name: str) -> Any:
    """The jnp dtype for a config name ('auto', 'float32' or 'bfloat16')."""
    return DTYPES[resolve_dtype_name(name)]


def configure_xla_cpu(name: str, environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Adds the XLA:CPU flags measured faster for this run's matmul dtype to ``XLA_FLAGS``; call it before JAX's
    CPU backend starts (the first computation). Only for float32 matmuls ('float32', or 'auto' on a CPU without
    bf16 instructions): YNNPACK fusions off. Nothing when the user's XLA_FLAGS already set a YNN flag or
    ``SOFTALIGN_XLA_DEFAULTS=0``. Returns the flag it added, or None. Harmless on GPU/TPU (CPU-only flag)."""
    if name not in CHOICES:
        raise ValueError(f"Unknown model dtype {name!r}; expected one of {list(CHOICES)}.")
    flags = environ.get("XLA_FLAGS", "")
    float32 = name == "float32" or (name == "auto" and not cpu_has_bf16())
    if not float32 or environ.get(OPT_OUT) == "0" or "ynn_fusion_type" in flags:
        return None
    environ["XLA_FLAGS"] = f"{flags} {YNN_OFF}".strip()
    return YNN_OFF
