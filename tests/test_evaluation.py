"""Tests for softalign.evaluation: retrieval and zero-shot definitions on hand-built cases, batched embedding."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from softalign.evaluation import (
    DEFAULT_TEMPLATES,
    build_classifier,
    embed_in_batches,
    get_templates,
    retrieval_chance,
    retrieval_metrics,
    zero_shot_metrics,
)

# ----------------------------------------------------------------------------- retrieval


def test_perfect_embeddings_give_full_recall():
    rng = np.random.default_rng(0)
    images = np.eye(4, 8, dtype=np.float32)
    text_to_image = np.repeat(np.arange(4), 5)
    texts = images[text_to_image] + 0.01 * rng.standard_normal((20, 8)).astype(np.float32)
    m = retrieval_metrics(images, texts, text_to_image)
    for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"):
        assert m[key] == 1.0, key
    assert m["i2t_mean_rank"] == m["t2i_mean_rank"] == m["i2t_median_rank"] == m["t2i_median_rank"] == 1.0


def test_shifted_captions_rank_second():
    # Caption j mostly points at image j+1 and a little at image j: every correct item ranks exactly 2nd.
    n = 5
    eye = np.eye(n, dtype=np.float32)
    images = eye
    texts = eye[(np.arange(n) + 1) % n] + 0.5 * eye
    m = retrieval_metrics(images, texts, np.arange(n), ks=(1, 2, 3))
    for d in ("i2t", "t2i"):
        assert m[f"{d}_R@1"] == 0.0
        assert m[f"{d}_R@2"] == 1.0 and m[f"{d}_R@3"] == 1.0
        assert m[f"{d}_mean_rank"] == 2.0 and m[f"{d}_median_rank"] == 2.0


def test_any_of_five_captions_counts_for_image_to_text():
    # Image 0's only top-scoring caption is its 3rd; its other four look like image 1.
    e0, e1 = np.eye(2, dtype=np.float32)
    decoy = 0.2 * e0 + e1
    texts = np.stack([decoy, decoy, e0, decoy, decoy] + [e1] * 5)
    text_to_image = np.repeat([0, 1], 5)
    m = retrieval_metrics(np.stack([e0, e1]), texts, text_to_image, ks=(1, 2))
    assert m["i2t_R@1"] == 1.0  # Each image has at least one caption at rank 1.
    assert m["i2t_mean_rank"] == 1.0
    # Text->image: the four decoys put image 1 first (rank 2); the other six captions are right.
    assert m["t2i_R@1"] == pytest.approx(6 / 10)
    assert m["t2i_R@2"] == 1.0
    assert m["t2i_mean_rank"] == pytest.approx((6 * 1 + 4 * 2) / 10)
    assert m["t2i_median_rank"] == 1.0


def test_ties_count_against_the_query():
    # A collapsed model (all embeddings equal) must not look perfect.
    m = retrieval_metrics(np.ones((3, 4)), np.ones((6, 4)), np.repeat(np.arange(3), 2), ks=(1,))
    assert m["i2t_R@1"] == 0.0 and m["t2i_R@1"] == 0.0
    assert m["i2t_mean_rank"] == 5.0  # 4 wrong captions tie ahead of the correct ones.
    assert m["t2i_mean_rank"] == 3.0


def _reference_ranks(images, texts, text_to_image):
    """Brute-force ranks via full argsort (no ties in random data)."""
    sim = images @ texts.T
    i2t = []
    for i in range(len(images)):
        order = np.argsort(-sim[i])
        i2t.append(1 + min(np.where(text_to_image[order] == i)[0]))
    t2i = []
    for j in range(len(texts)):
        order = np.argsort(-sim[:, j])
        t2i.append(1 + np.where(order == text_to_image[j])[0][0])
    return np.array(i2t), np.array(t2i)


def test_chunked_matches_brute_force():
    rng = np.random.default_rng(1)
    images = rng.standard_normal((23, 6)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    text_to_image = rng.permutation(np.concatenate([np.arange(23), rng.integers(0, 23, 40)]))
    texts = images[text_to_image] + rng.standard_normal((63, 6)).astype(np.float32)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    i2t, t2i = _reference_ranks(images, texts, text_to_image)
    for chunk in (1, 7, 1000):
        m = retrieval_metrics(images, texts, text_to_image, ks=(1, 5, 10), chunk_size=chunk)
        for k in (1, 5, 10):
            assert m[f"i2t_R@{k}"] == pytest.approx(np.mean(i2t <= k))
            assert m[f"t2i_R@{k}"] == pytest.approx(np.mean(t2i <= k))
        assert m["i2t_mean_rank"] == pytest.approx(i2t.mean())
        assert m["t2i_median_rank"] == pytest.approx(np.median(t2i))


def test_retrieval_rejects_images_without_captions():
    with pytest.raises(ValueError, match="at least one caption"):
        retrieval_metrics(np.eye(3), np.eye(3)[:2], np.array([0, 1]))
    with pytest.raises(ValueError):
        retrieval_metrics(np.eye(3), np.eye(3), np.array([0, 1, 3]))


def test_retrieval_chance():
    c = retrieval_chance(num_images=10, num_texts=50, captions_per_image=5, k=1)
    assert c["i2t_R@1"] == pytest.approx(0.1) and c["t2i_R@1"] == pytest.approx(0.1)
    c = retrieval_chance(10, 50, 5, 5)
    assert c["t2i_R@5"] == pytest.approx(0.5)
    assert c["i2t_R@5"] == pytest.approx(1 - math.comb(45, 5) / math.comb(50, 5))
    assert retrieval_chance(10, 50, 5, 46)["i2t_R@46"] == 1.0
    assert retrieval_chance(10, 50, 5, 20)["t2i_R@20"] == 1.0


# ----------------------------------------------------------------------------- zero-shot


def test_zero_shot_perfect_and_k_at_least_num_classes():
    labels = np.array([0, 1, 2, 2, 1])
    m = zero_shot_metrics(np.eye(3)[labels], np.eye(3), labels, ks=(1, 5))
    assert m == {"top1": 1.0, "top5": 1.0, "mean_per_class_recall": 1.0}
    wrong = zero_shot_metrics(np.eye(3)[(labels + 1) % 3], np.eye(3), labels, ks=(1, 3, 5))
    assert wrong["top1"] == 0.0 and wrong["top3"] == 1.0 and wrong["top5"] == 1.0


def test_mean_per_class_recall_imbalanced():
    # Class 0: 3/4 right, class 1: 0/1, class 2: 2/2; class 3 never occurs and is not averaged.
    labels = np.array([0, 0, 0, 0, 1, 2, 2])
    predicted = np.array([0, 0, 0, 2, 0, 2, 2])
    m = zero_shot_metrics(np.eye(4)[predicted], np.eye(4), labels, ks=(1,))
    assert m["top1"] == pytest.approx(5 / 7)
    assert m["mean_per_class_recall"] == pytest.approx((3 / 4 + 0 + 1) / 3)


class _ListTokenizer:
    """Maps each prompt to its index in a fixed vocabulary of whole prompts."""

    def __init__(self, prompts):
        self.prompts = list(prompts)

    def encode_batch(self, texts):
        return np.array([[self.prompts.index(t)] for t in texts], dtype=np.int32)


def test_build_classifier_normalises_then_averages():
    vectors = {
        "a cat.": [3.0, 4.0, 0.0],   # -> [.6, .8, 0]
        "the cat!": [0.0, 0.0, 2.0],  # -> [0, 0, 1]
        "a dog.": [1.0, 0.0, 0.0],
        "the dog!": [10.0, 0.0, 0.0],
    }
    tok = _ListTokenizer(vectors)
    table = np.array(list(vectors.values()), dtype=np.float32)
    calls = []

    def encode_text(tokens):
        calls.append(tokens.shape)
        return table[tokens[:, 0]]

    w = build_classifier(encode_text, tok, ["cat", "dog"], ["a {}.", "the {}!"])
    expected_cat = np.array([0.3, 0.4, 0.5]) / math.sqrt(0.5)
    np.testing.assert_allclose(w, [expected_cat, [1.0, 0.0, 0.0]], rtol=1e-6)
    assert calls == [(2, 1), (2, 1)]  # One call per template, all class names at once.
    with pytest.raises(ValueError, match="placeholder"):
        build_classifier(encode_text, tok, ["cat"], ["no placeholder"])


def test_templates_default_and_override():
    assert 6 <= len(DEFAULT_TEMPLATES) <= 8 and all("{}" in t for t in DEFAULT_TEMPLATES)
    assert get_templates() == DEFAULT_TEMPLATES
    assert get_templates("scenes", {"scenes": ["a render of {}."]}) == ("a render of {}.",)
    assert get_templates("other", {"scenes": ["a render of {}."]}) == DEFAULT_TEMPLATES


# ----------------------------------------------------------------------------- embed_in_batches


@pytest.mark.parametrize("n", [10, 8, 3, 1])
def test_embed_in_batches_pads_last_batch_and_compiles_once(n):
    traces = []

    @jax.jit
    def fn(x):
        traces.append(x.shape)  # Python side effect: runs once per trace/compilation.
        return jnp.tanh(x.reshape(x.shape[0], -1) @ jnp.ones((12, 5)))

    images = np.random.default_rng(0).standard_normal((n, 2, 2, 3)).astype(np.float32)
    done = []
    out = embed_in_batches(fn, images, batch_size=4, progress=lambda d, t: done.append((d, t)))
    assert traces == [(4, 2, 2, 3)]
    assert out.shape == (n, 5) and isinstance(out, np.ndarray)
    expected = np.tanh(images.reshape(n, -1) @ np.ones((12, 5)))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert done[-1] == (-(-n // 4), -(-n // 4)) and len(done) == -(-n // 4)


def test_embed_in_batches_tokens_unjitted_fn_and_empty():
    traces = []

    def fn(tokens):
        traces.append(1)
        return jnp.stack([tokens.sum(axis=1), tokens.max(axis=1)], axis=1)

    tokens = np.arange(7 * 3, dtype=np.int32).reshape(7, 3)
    out = embed_in_batches(fn, tokens, batch_size=3)
    np.testing.assert_array_equal(out, np.stack([tokens.sum(1), tokens.max(1)], 1))
    assert len(traces) == 1
    empty = embed_in_batches(fn, tokens[:0], batch_size=3)
    assert empty.shape == (0, 2) and empty.dtype == np.int32


def test_embed_in_batches_with_single_device_sharding():
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    out = embed_in_batches(lambda x: x * 2, np.ones((5, 3), np.float32), 2, NamedSharding(mesh, P("data")))
    np.testing.assert_array_equal(out, 2 * np.ones((5, 3)))


_TWO_DEVICE_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from softalign.evaluation import embed_in_batches
    assert jax.device_count() == 2, jax.devices()
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    x = np.arange(14, dtype=np.float32).reshape(7, 2)
    out = embed_in_batches(lambda b: b + 1, x, 4, sharding)
    np.testing.assert_array_equal(out, x + 1)
    try:
        embed_in_batches(lambda b: b, x, 3, sharding)
    except ValueError as e:
        print("OK", e)
""")


def test_embed_in_batches_two_devices_divisibility():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _TWO_DEVICE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "OK batch_size=3 is not divisible by the 2 devices" in proc.stdout
