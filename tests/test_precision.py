"""model.dtype='auto': bfloat16 only where the device multiplies it natively (softalign/models/precision.py)."""

import jax.numpy as jnp
import pytest

from softalign.models import precision
from softalign.models.presets import model_preset


def _cpuinfo(tmp_path, text: str) -> str:
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    precision.cpu_has_bf16.cache_clear()
    return str(path)


@pytest.mark.parametrize("text, expected", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n", False),                     # AVX2-only x86 (Zen 3)
    ("flags\t\t: avx2 avx512f avx512_bf16 avx512_vnni\n", True),                   # Zen 4/5, Cooper Lake
    ("flags\t\t: avx512f amx_bf16 amx_tile amx_int8\n", True),                     # Sapphire Rapids
    ("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n", True),                # Neoverse V1/V2, Graviton 3
    ("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n", False),               # Neoverse N1
])
def test_cpu_flags(tmp_path, text, expected):
    assert precision.cpu_has_bf16(_cpuinfo(tmp_path, text)) is expected


def test_unreadable_cpuinfo_means_no_bf16(tmp_path):
    assert precision.cpu_has_bf16(str(tmp_path / "missing")) is False


def test_auto_resolves_by_platform(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert precision.resolve_dtype_name("auto", "cpu") == "float32"
    assert precision.resolve_dtype_name("auto", "gpu") == "bfloat16"
    assert precision.resolve_dtype_name("auto", "tpu") == "bfloat16"
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.resolve_dtype_name("auto", "cpu") == "bfloat16"
    assert precision.resolve_dtype_name("float32", "tpu") == "float32"  # an explicit name is kept
    assert precision.compute_dtype("bfloat16") == jnp.bfloat16


def test_bad_name_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown model dtype 'fp16'"):
        precision.resolve_dtype_name("fp16")


def test_presets_default_to_auto(monkeypatch):
    cfg = model_preset("ViT-B/16")
    assert cfg.dtype == "auto"
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert precision.compute_dtype(cfg.dtype) == jnp.float32


def test_xla_cpu_flags_only_for_float32_matmuls(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert precision.configure_xla_cpu("auto", env) == precision.YNN_OFF
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x " + precision.YNN_OFF
    assert precision.configure_xla_cpu("auto", env) is None  # once: a YNN flag is already there
    assert precision.configure_xla_cpu("bfloat16", {}) is None  # YNNPACK carries the bf16 matmuls
    assert precision.configure_xla_cpu("float32", {precision.OPT_OUT: "0"}) is None
    user = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
    assert precision.configure_xla_cpu("float32", user) is None and user["XLA_FLAGS"].endswith("=dot")
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.configure_xla_cpu("auto", {}) is None  # auto is bfloat16 on this CPU
    assert precision.configure_xla_cpu("float32", {}) == precision.YNN_OFF
    with pytest.raises(ValueError):
        precision.configure_xla_cpu("half", {})
