"""FLIP's patch masking (model.vision.mask_ratio): the kept set, eval unmasked, ratio 0 unchanged, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_step import _run, _setup

from softalign.models import build_model, vit
from softalign.parallel import sharding


def test_keep_indices_count_distinct_and_follow_the_rng():
    idx = np.asarray(vit.keep_indices(jax.random.key(3), 6, 16, 0.75))
    assert idx.shape == (6, 4)
    assert all(len(set(row)) == 4 and row.min() >= 0 and row.max() < 16 for row in idx)
    noise = np.asarray(jax.random.uniform(jax.random.key(3), (6, 16)))
    np.testing.assert_array_equal(idx, np.argsort(noise, axis=1, kind="stable")[:, :4])  # argsort of the noise
    np.testing.assert_array_equal(idx, np.asarray(vit.keep_indices(jax.random.key(3), 6, 16, 0.75)))
    assert not np.array_equal(idx, np.asarray(vit.keep_indices(jax.random.key(4), 6, 16, 0.75)))
    assert vit.keep_indices(jax.random.key(0), 2, 16, 0.5).shape == (2, 8)
    assert vit.keep_indices(jax.random.key(0), 2, 10, 0.25).shape == (2, 7)  # int(L * (1 - r)), as FLIP


def _tokens_seen(ratio, key, pool="cls"):
    """Which tokens reach ln_pre: run the tower with identity-like inputs and capture ln_pre's input."""
    tower = vit.VisionTransformer(image_size=16, patch_size=4, width=8, depth=1, num_heads=2, embed_dim=4,
                                  pool=pool, mask_ratio=ratio)
    images = jnp.zeros((3, 16, 16, 3))
    params = tower.init(jax.random.key(0), images)["params"]
    # Patches all zero: a token is its position embedding, so the captured rows name the kept positions.
    _, state = tower.apply({"params": params}, images, train=True, rngs={"mask": key},
                           capture_intermediates=lambda m, _: m.name == "ln_pre", mutable=["intermediates"])
    return params, np.asarray(state["intermediates"]["ln_pre"]["__call__"][0])


def test_masking_keeps_cls_plus_the_drawn_patches():
    key = jax.random.key(7)
    params, seen = _tokens_seen(0.5, key)
    pos = np.asarray(params["pos_embedding"])
    ln = vit.layer_norm("ln_pre")
    pos_ln = np.asarray(ln.apply({"params": params["ln_pre"]}, jnp.asarray(pos)))
    assert seen.shape == (3, 1 + 8, 8)  # [cls] + 16 * (1 - 0.5)
    np.testing.assert_allclose(seen[:, 0], np.broadcast_to(
        np.asarray(ln.apply({"params": params["ln_pre"]}, params["cls_token"] + params["pos_embedding"][0])),
        (3, 8)), rtol=1e-6, atol=1e-6)
    # each kept token is one patch's position: find which, per row (flax derives the tower's key from `key`)
    dist = np.abs(seen[:, 1:, None, :] - pos_ln[None, None, 1:, :]).max(-1)  # (3, 8, 16)
    kept = dist.argmin(-1)
    assert dist.min(-1).max() < 1e-5
    assert all(len(set(row)) == 8 for row in kept)  # 8 distinct patches per row
    assert len({tuple(sorted(row)) for row in kept}) > 1  # rows draw their own subsets
    _, again = _tokens_seen(0.5, key)
    np.testing.assert_array_equal(again, seen)  # the same key: the same kept set
    _, other = _tokens_seen(0.5, jax.random.key(8))
    assert not np.allclose(other, seen)
    _, gap = _tokens_seen(0.25, key, pool="gap")
    assert gap.shape == (3, 12, 8)


def test_no_masking_at_evaluation_or_ratio_zero():
    c = _setup()[0]
    c.model.text.update(vocab_size=50, eot_id=2, context_length=8)
    images = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
    tokens = jnp.ones((4, 8), jnp.int32)
    plain = build_model(c.model)
    params = plain.init(jax.random.key(0), images, tokens)["params"]
    c.model.vision.mask_ratio = 0.5
    masked = build_model(c.model)
    ref = plain.apply({"params": params}, images, tokens)
    for out in (masked.apply({"params": params}, images, tokens),  # train=False: eval
                masked.apply({"params": params}, images, method=masked.encode_image)):
        np.testing.assert_array_equal(np.asarray(out[0] if isinstance(out, tuple) else out), np.asarray(ref[0]))
    train = masked.apply({"params": params}, images, tokens, train=True, rngs={"mask": jax.random.key(2)})
    assert not np.allclose(np.asarray(train[0]), np.asarray(ref[0]))
    np.testing.assert_array_equal(np.asarray(train[1]), np.asarray(ref[1]))  # text untouched
    # ratio 0 in train mode lowers to exactly the eval computation
    zero_train = jax.jit(lambda p: plain.apply({"params": p}, images, tokens, train=True,
                                               rngs={"mask": jax.random.key(2)})).lower(params).as_text()
    zero_eval = jax.jit(lambda p: plain.apply({"params": p}, images, tokens)).lower(params).as_text()
    assert zero_train == zero_eval


def _masked_setup(ratio, **model):
    setup = list(_setup("ema"))
    setup[0].model.vision.mask_ratio = ratio
    setup[0].model.update(model)
    setup[1] = build_model(setup[0].model)
    if model:  # scan_layers stacks the block params: init them for this model
        b = setup[6][0]
        setup[5] = setup[1].init(jax.random.key(0), b["image"][:1], b["tokens"][:1])["params"]
    return setup


def test_masked_step_teacher_sees_the_full_image():
    """Step 0: the EMA teacher holds the student's params, so its targets (teacher_entropy) do not depend on the
    student's mask, while the student's loss does."""
    _, l0, _, m0 = _run(sharding.make_mesh(1), *_setup("ema"))
    _, l5, _, m5 = _run(sharding.make_mesh(1), *_masked_setup(0.5))
    assert float(m5[0]["teacher_entropy"]) == float(m0[0]["teacher_entropy"])
    assert l5[0] != l0[0]


@pytest.mark.parametrize("model", [{}, {"scan_layers": True, "remat": True}])
def test_masked_step_8_devices_equal_1(model):
    setup = _masked_setup(0.5, **model)
    s1, l1, _, _ = _run(sharding.make_mesh(1), *setup)
    s8, l8, _, _ = _run(sharding.make_mesh(8), *setup)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-6)


def test_masked_step_bfloat16_and_chunked_loss():
    setup = _masked_setup(0.75, dtype="bfloat16")
    _, losses, _, _ = _run(sharding.make_mesh(8), *setup, loss_chunk_size=3)
    _, unchunked, _, _ = _run(sharding.make_mesh(8), *setup)
    assert np.all(np.isfinite(losses))
    np.testing.assert_allclose(losses, unchunked, rtol=2e-3)


def test_mask_ratio_validated():
    c = _setup()[0]
    c.model.text.update(vocab_size=50, eot_id=2)
    for bad in (1.0, -0.1, 0.99):  # 0.99 keeps int(4 * 0.01) = 0 of the 4 patches
        c.model.vision.mask_ratio = bad
        with pytest.raises(ValueError, match="mask_ratio"):
            build_model(c.model)


def _manual_cls_attention(params, images, patch, heads):
    """Depth-1 tower by hand: [cls]'s softmax attention over the patches, averaged over heads (float32)."""
    p = params["vision"]
    n, size, _, c = images.shape
    k = patch
    patches = images.reshape(n, size // k, k, size // k, k, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, -1, k * k * c)
    x = patches @ np.asarray(p["patch_embed"]["kernel"]).reshape(k * k * c, -1)
    x = np.concatenate([np.broadcast_to(p["cls_token"], (n, 1, x.shape[-1])), x], 1) + np.asarray(p["pos_embedding"])

    def ln(z, q):
        z = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-5)
        return z * np.asarray(q["scale"]) + np.asarray(q["bias"])
    blk = p["transformer"]["resblocks_0"]
    h = ln(ln(x, p["ln_pre"]), blk["ln_1"]) @ np.asarray(blk["attn"]["in_proj"]["kernel"]) \
        + np.asarray(blk["attn"]["in_proj"]["bias"])
    w = x.shape[-1]
    q, kk = (h[..., i * w:(i + 1) * w].reshape(n, -1, heads, w // heads) for i in (0, 1))
    logits = np.einsum("nhd,nlhd->nhl", q[:, 0], kk) / np.sqrt(w // heads)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return probs.mean(1)[:, 1:]


def test_attentive_keep_takes_the_most_attended_patches():
    from softalign.models.clip import attentive_keep
    c = _setup()[0]
    c.model.text.update(vocab_size=50, eot_id=2, context_length=8)
    c.model.vision.update(mask="attentive", mask_ratio=0.5, patch_size=2)  # 16 patches
    model = build_model(c.model)
    images = jax.random.normal(jax.random.key(1), (3, 8, 8, 3))
    params = model.init(jax.random.key(0), images, jnp.ones((3, 8), jnp.int32))["params"]
    keep = np.asarray(attentive_keep(model, params, images, 0.5))
    attention = _manual_cls_attention(jax.tree.map(np.asarray, params), np.asarray(images), 2, c.model.vision.num_heads)
    np.testing.assert_array_equal(np.sort(keep, 1), np.sort(np.argsort(-attention, 1)[:, :8], 1))
    # the student with `keep` equals the unmasked tower on exactly those patches' tokens: check via train=False
    full = model.apply({"params": params}, images, jnp.ones((3, 8), jnp.int32))[0]
    masked = model.apply({"params": params}, images, jnp.ones((3, 8), jnp.int32), keep=jnp.asarray(keep))[0]
    all_kept = model.apply({"params": params}, images, jnp.ones((3, 8), jnp.int32),
                           keep=jnp.tile(jnp.arange(16), (3, 1)))[0]
    np.testing.assert_allclose(np.asarray(all_kept), np.asarray(full), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(masked), np.asarray(full))


def test_attentive_step_8_devices_equal_1_and_needs_a_params_teacher():
    setup = _masked_setup(0.5)
    setup[0].model.vision.mask = "attentive"
    setup[1] = build_model(setup[0].model)
    s1, l1, _, _ = _run(sharding.make_mesh(1), *setup)
    s8, l8, _, _ = _run(sharding.make_mesh(8), *setup)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-5, atol=2e-6)
    with pytest.raises(ValueError, match="attentive"):
        _run(sharding.make_mesh(1), *setup, psd=dict(setup[0].psd, teacher="self"))


def test_unmasked_tuning_steps_see_every_patch():
    """FLIP's unmasked tuning: with the last step unmasked, step 0 is the masked step and step 1 differs from it;
    with every step unmasked the run equals the unmasked one exactly."""
    plain = _run(sharding.make_mesh(1), *_setup("ema"))[1]
    masked = _run(sharding.make_mesh(1), *_masked_setup(0.5))[1]
    steps = 2  # the tiny setup's two batches
    last = _run(sharding.make_mesh(1), *_masked_setup(0.5, vision=dict(_setup()[0].model.vision, mask_ratio=0.5,
                                                                       unmask_last_steps=1)), num_steps=steps)[1]
    every = _run(sharding.make_mesh(1), *_masked_setup(0.5, vision=dict(_setup()[0].model.vision, mask_ratio=0.5,
                                                                        unmask_last_steps=steps)), num_steps=steps)[1]
    assert last[0] == masked[0] and last[1] != masked[1]
    assert every == plain
    c = _setup()[0]
    c.model.text.update(vocab_size=50, eot_id=2)
    c.model.vision.unmask_last_steps = 1  # without a mask there is nothing to unmask
    with pytest.raises(ValueError, match="unmask_last_steps"):
        build_model(c.model)
