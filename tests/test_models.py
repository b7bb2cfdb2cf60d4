"""Tests for softalign.models: open_clip parameter counts, output contract, pooling, masks, dtypes, naming."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from softalign.models import CLIP, build_model, list_presets, model_preset
from softalign.models.layers import LN_EPS, MultiHeadSelfAttention, Transformer, exact_gelu, layer_norm, quick_gelu
from softalign.models.vit import VisionTransformer

N = 2  # Batch size for forward tests.


def _inputs(cfg, n: int = N, seed: int = 0):
    """Random images and token rows with an EOT somewhere in the middle of each row."""
    rng = np.random.default_rng(seed)
    s, length = cfg.vision.image_size, cfg.text.context_length
    images = rng.standard_normal((n, s, s, 3)).astype(np.float32)
    tokens = rng.integers(1, cfg.text.eot_id, size=(n, length)).astype(np.int32)
    tokens[:, length // 2] = cfg.text.eot_id
    return jnp.asarray(images), jnp.asarray(tokens)


def _param_shapes(name: str):
    """Abstract params of a preset without allocating any weights."""
    cfg = model_preset(name)
    model = build_model(cfg)
    images = jax.ShapeDtypeStruct((1, cfg.vision.image_size, cfg.vision.image_size, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, cfg.text.context_length), jnp.int32)
    return jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"]


def _count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _float32_demo():
    cfg = model_preset("demo")
    cfg.dtype = "float32"
    return cfg


@pytest.fixture(scope="module")
def demo():
    """(config, model, variables) for the tiny demo preset, in float32: the exactness tests below must not depend
    on a CPU's bfloat16 kernels (they differ between CPU families); bfloat16 has its own tolerance test."""
    cfg = _float32_demo()
    model = build_model(cfg)
    assert hash(model) == hash(CLIP(_float32_demo()))  # Frozen config: usable as a static jit arg.
    variables = jax.jit(model.init)(jax.random.key(0), *_inputs(cfg))
    return cfg, model, variables


@pytest.mark.parametrize(
    "name, total, vision",
    [("ViT-B/16", 149_620_737, 86_192_640), ("ViT-B/32", 151_277_313, 87_849_216)],
)
def test_param_counts_match_open_clip(name, total, vision):
    params = _param_shapes(name)
    assert sorted(params) == ["logit_scale", "text", "vision"]
    assert _count(params) == total
    assert _count(params["vision"]) == vision
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


def test_presets_listed_and_buildable():
    names = list_presets()
    for required in ("ViT-Ti/16", "ViT-S/16", "ViT-B/16", "ViT-B/32", "demo"):
        assert required in names
    assert _count(_param_shapes("ViT-S/16")) > _count(_param_shapes("ViT-Ti/16"))
    with pytest.raises(ValueError, match="Unknown model preset"):
        model_preset("ViT-Z/99")


def test_demo_outputs_shapes_and_unit_norm(demo):
    cfg, model, variables = demo
    images, tokens = _inputs(cfg)
    img, txt, scale = jax.jit(model.apply)(variables, images, tokens)
    assert img.shape == (N, cfg.embed_dim) and txt.shape == (N, cfg.embed_dim)
    assert img.dtype == txt.dtype == scale.dtype == jnp.float32
    assert scale.shape == ()
    np.testing.assert_allclose(jnp.linalg.norm(img, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(txt, axis=-1), 1.0, atol=1e-5)
    # The encode_* methods are what evaluators call; they must agree with __call__.
    enc_img = jax.jit(lambda v, x: model.apply(v, x, method=CLIP.encode_image))(variables, images)
    enc_txt = jax.jit(lambda v, t: model.apply(v, t, method=CLIP.encode_text))(variables, tokens)
    np.testing.assert_allclose(enc_img, img, atol=1e-5)
    np.testing.assert_allclose(enc_txt, txt, atol=1e-5)


def test_logit_scale_init_and_clamp(demo):
    cfg, model, variables = demo
    images, tokens = _inputs(cfg)
    np.testing.assert_allclose(variables["params"]["logit_scale"], math.log(1 / 0.07), rtol=1e-6)
    apply = jax.jit(model.apply)
    _, _, scale = apply(variables, images, tokens)
    np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-5)
    big = {"params": {**variables["params"], "logit_scale": jnp.float32(math.log(1000.0))}}
    _, _, scale = apply(big, images, tokens)
    assert float(scale) == pytest.approx(100.0)


def test_text_pools_at_first_eot(demo):
    cfg, model, variables = demo
    _, tokens = _inputs(cfg, n=1)
    eot_pos = cfg.text.context_length // 2
    encode = jax.jit(lambda t: model.apply(variables, t, method=CLIP.encode_text))
    base = encode(tokens)
    after = tokens.at[0, eot_pos + 2].set(7).at[0, -1].set(cfg.text.eot_id)  # Incl. a second EOT.
    np.testing.assert_allclose(encode(after), base, atol=1e-6)
    before = tokens.at[0, eot_pos - 2].set((tokens[0, eot_pos - 2] + 1) % cfg.text.eot_id)
    assert float(jnp.max(jnp.abs(encode(before) - base))) > 1e-4
    # Moving the EOT earlier moves the pooled position, so the embedding changes.
    earlier = tokens.at[0, 3].set(cfg.text.eot_id)
    assert float(jnp.max(jnp.abs(encode(earlier) - base))) > 1e-4


def test_causal_mask():
    length, width, j = 8, 32, 5
    x = jax.random.normal(jax.random.key(1), (1, length, width))
    x2 = x.at[0, j].set(jax.random.normal(jax.random.key(3), (width,)))

    @jax.jit
    def change(key):
        """Per-position output change when input position j changes, for a causal and a bidirectional stack."""
        diffs = []
        for causal in (True, False):
            block = Transformer(width=width, depth=2, num_heads=4, causal=causal)
            params = block.init(key, x)
            diffs.append(jnp.max(jnp.abs(block.apply(params, x2) - block.apply(params, x)), axis=-1)[0])
        return diffs

    causal_diff, full_diff = change(jax.random.key(2))
    assert float(jnp.min(causal_diff[j:])) > 1e-4  # Position j and later see the change...
    np.testing.assert_allclose(causal_diff[:j], 0.0, atol=1e-6)  # ...earlier positions do not.
    assert float(jnp.min(full_diff)) > 1e-4  # Without the mask every position does.


@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_reference_layout(causal):
    """Fused in_proj output is [q | k | v], each (num_heads, head_dim): torch's in_proj_weight.T layout."""
    width, heads, length = 32, 4, 6
    attn = MultiHeadSelfAttention(width=width, num_heads=heads, causal=causal)
    x = jax.random.normal(jax.random.key(0), (2, length, width))

    @jax.jit
    def ours_and_reference(key):
        params = attn.init(key, x)["params"]
        qkv = x @ params["in_proj"]["kernel"] + params["in_proj"]["bias"]
        q, k, v = (t.reshape(2, length, heads, width // heads) for t in jnp.split(qkv, 3, axis=-1))
        ref = jax.nn.dot_product_attention(q, k, v, is_causal=causal).reshape(2, length, width)
        ref = ref @ params["out_proj"]["kernel"] + params["out_proj"]["bias"]
        return attn.apply({"params": params}, x), ref

    ours, ref = ours_and_reference(jax.random.key(1))
    np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_gradients_match_plain_autodiff(dtype):
    """The head-major projections (and bf16's custom matmul VJP) give autodiff's gradients of the plain form."""
    width, heads, length = 32, 4, 6
    attn = MultiHeadSelfAttention(width=width, num_heads=heads, causal=True, dtype=dtype)
    x = jax.random.normal(jax.random.key(0), (2, length, width))
    params = attn.init(jax.random.key(1), x)["params"]
    weights = jax.random.normal(jax.random.key(2), (2, length, width))

    def reference(p, x):
        cast = (lambda t: t.astype(dtype).astype(jnp.float32))  # the rounding of matmul inputs bf16 compute does
        qkv = cast(x) @ cast(p["in_proj"]["kernel"]) + p["in_proj"]["bias"]
        q, k, v = (cast(t).reshape(2, length, heads, width // heads) for t in jnp.split(qkv, 3, axis=-1))
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(2, length, width)
        return cast(out) @ cast(p["out_proj"]["kernel"]) + p["out_proj"]["bias"]

    loss = lambda f: jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.sin(f(p, x)) * weights), argnums=(0, 1)))
    ours = loss(lambda p, x: attn.apply({"params": p}, x))(params, x)
    ref = loss(reference)(params, x)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bf16: measured 0.4%; the two round at different places
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, atol=tol * float(jnp.max(jnp.abs(b))), rtol=0)


def test_layer_norm_matches_numpy_and_flax_autodiff():
    """layers.LayerNorm (hand-written backward) against a float64 NumPy forward and autodiff of nn.LayerNorm."""
    x = jax.random.normal(jax.random.key(0), (3, 5, 16)) * 3 + 1
    ours, ref = layer_norm("ln"), nn.LayerNorm(epsilon=LN_EPS)
    params = ref.init(jax.random.key(1), x)
    params = jax.tree.map(lambda a: a + jax.random.normal(jax.random.key(2), a.shape), params)  # not 1 and 0
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, params)
    x64 = np.asarray(x, np.float64)
    centred = x64 - x64.mean(-1, keepdims=True)
    p = params["params"]
    expected = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + LN_EPS) * p["scale"] + p["bias"]
    np.testing.assert_allclose(ours.apply(params, x), expected, atol=2e-5)
    weights = jax.random.normal(jax.random.key(3), x.shape)
    grad = lambda m: jax.grad(lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)) * weights), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(grad(ours)), jax.tree.leaves(grad(ref))):
        np.testing.assert_allclose(a, b, atol=2e-5)
    x16 = x.astype(jnp.bfloat16)  # a bf16 input gets a bf16 cotangent (custom_vjp requires the primal's dtype)
    assert jax.grad(lambda x: jnp.sum(ours.apply(params, x)))(x16).dtype == jnp.bfloat16


def test_bad_patch_size_raises():
    cfg = model_preset("demo")
    cfg.vision.patch_size = 5
    with pytest.raises(ValueError, match="divisible by patch_size"):
        build_model(cfg)
    vit = VisionTransformer(image_size=32, patch_size=5, width=16, depth=1, num_heads=2, embed_dim=8)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        vit.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_bf16_compute_close_to_f32(demo):
    cfg, model, variables = demo
    images, tokens = _inputs(cfg)
    cfg16 = model_preset("demo")
    cfg16.dtype = "bfloat16"
    model16 = build_model(cfg16)
    img, txt, _ = jax.jit(model.apply)(variables, images, tokens)
    img16, txt16, scale16 = jax.jit(model16.apply)(variables, images, tokens)  # Same float32 params.
    for a, b in ((img, img16), (txt, txt16)):
        assert b.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(b)))
        cos = jnp.sum(a * b, axis=-1)
        assert float(jnp.min(cos)) > 0.99
    assert scale16.dtype == jnp.float32
    assert "bf16" in str(jax.make_jaxpr(model16.apply)(variables, images, tokens))  # Really computes in bf16.
    shapes16 = jax.eval_shape(model16.init, jax.random.key(0), images, tokens)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes16))


def test_param_naming_contract(demo):
    _, _, variables = demo
    flat = flatten_dict(variables["params"])
    assert ("logit_scale",) in flat
    for path, leaf in flat.items():
        name, where = path[-1], "/".join(path)
        is_embedding = "embedding" in name or name == "cls_token" or "token_embedding" in path
        if is_embedding:
            assert name != "kernel", where
        if leaf.ndim >= 2 and not is_embedding:
            assert name == "kernel", f"matmul weight {where} must be named 'kernel'"
        if name == "kernel":
            assert leaf.ndim >= 2, where
        allowed = {"kernel", "bias", "scale", "embedding", "pos_embedding", "cls_token", "logit_scale"}
        assert name in allowed, where
    qkv = flat[("vision", "transformer", "resblocks_0", "attn", "in_proj", "kernel")]
    assert qkv.shape == (128, 3 * 128)


def test_remat_keeps_tree_and_numbers():
    cfg = model_preset("demo")
    cfg_r = model_preset("demo")
    cfg_r.remat = True
    inputs = _inputs(cfg, n=1)
    trees = [
        jax.tree.map(lambda x: (x.shape, x.dtype), jax.eval_shape(build_model(c).init, jax.random.key(0), *inputs))
        for c in (cfg, cfg_r)
    ]
    assert trees[0] == trees[1]  # Checkpoints and sharding rules do not care about remat.

    x = jax.random.normal(jax.random.key(1), (2, 6, 32))
    plain = Transformer(width=32, depth=2, num_heads=4)
    remat = Transformer(width=32, depth=2, num_heads=4, remat=True)

    @jax.jit
    def both(key):
        params = plain.init(key, x)
        return [jax.value_and_grad(lambda p: jnp.sum(m.apply(p, x) ** 2))(params) for m in (plain, remat)]

    (v0, g0), (v1, g1) = both(jax.random.key(2))
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_gap_pool_and_quick_gelu():
    vit = VisionTransformer(
        image_size=16, patch_size=4, width=32, depth=1, num_heads=4, embed_dim=8, pool="gap",
        activation="quick_gelu",
    )
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    variables, out = jax.jit(lambda k: (v := vit.init(k, images), vit.apply(v, images)))(jax.random.key(1))
    assert "cls_token" not in variables["params"]
    assert variables["params"]["pos_embedding"].shape == (16, 32)
    assert out.shape == (2, 8) and bool(jnp.all(jnp.isfinite(out)))


def test_activations_match_torch_definitions():
    x = jnp.linspace(-4.0, 4.0, 17)
    erf_gelu = 0.5 * x * (1.0 + jax.scipy.special.erf(x / jnp.sqrt(2.0)))
    np.testing.assert_allclose(exact_gelu(x), erf_gelu, atol=1e-6)
    np.testing.assert_allclose(quick_gelu(x), x / (1.0 + jnp.exp(-1.702 * x)), atol=1e-6)


def test_scan_layers_matches_unrolled_blocks():
    """model.scan_layers stacks the blocks' params along depth; with the same weights the outputs are identical."""
    cfg = _float32_demo()  # bfloat16 rounding would differ between the two layouts, and between CPUs
    cfg.text.eot_id = 2
    unrolled = build_model(cfg)
    cfg_scan = _float32_demo()
    cfg_scan.text.eot_id = 2
    cfg_scan.scan_layers = True
    scanned = build_model(cfg_scan)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    tokens = jnp.asarray([[1, 5, 6, 2] + [0] * 20] * 2, jnp.int32)
    params = unrolled.init(jax.random.key(0), images, tokens)["params"]
    scan_shapes = jax.eval_shape(scanned.init, jax.random.key(0), images, tokens)["params"]
    assert sum(x.size for x in jax.tree.leaves(scan_shapes)) == sum(x.size for x in jax.tree.leaves(params))

    def stack(tower):
        t = dict(tower)
        blocks = [t["transformer"].pop(f"resblocks_{i}") for i in range(cfg.vision.depth)]
        t["transformer"] = {"resblocks": {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}}
        return t

    p = jax.tree.map(lambda x: x, params)
    stacked = {"logit_scale": p["logit_scale"], "vision": stack(p["vision"]), "text": stack(p["text"])}
    assert jax.tree.structure(stacked) == jax.tree.structure(scan_shapes)
    a = unrolled.apply({"params": params}, images, tokens)
    b = scanned.apply({"params": stacked}, images, tokens)
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
