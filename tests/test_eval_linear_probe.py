"""Linear probe: accuracy on separable features, strength chosen on validation (never test), the evaluator."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from softalign.evaluation import linear_probe as lp  # noqa: E402

SMALL_GRID = (1e-4, 1e4, 9)


def _clusters(n, centers, rng, noise=0.3):
    y = rng.integers(0, len(centers), n)
    return centers[y] + noise * rng.standard_normal((n, centers.shape[1])), y


def test_separable_features_reach_99_percent():
    rng = np.random.default_rng(0)
    centers = 3.0 * rng.standard_normal((4, 16))
    train_x, train_y = _clusters(240, centers, rng)
    test_x, test_y = _clusters(200, centers, rng)
    result = lp.linear_probe(train_x, train_y, test_x, test_y, grid=SMALL_GRID, refine_steps=1)
    assert result.test_top1 >= 0.99 and result.test_mean_per_class_recall >= 0.99
    assert result.val_top1 >= 0.99
    assert SMALL_GRID[0] <= result.l2 <= SMALL_GRID[1]
    assert result.val_scores[result.l2] == result.val_top1
    m = result.metrics()
    assert set(m) == {"top1", "mean_per_class_recall", "val_top1", "log10_l2"}


def _validation_vs_test_case():
    """Train/val: class 0 at x=-2, class 1 at x=+2 (train 60% class 0), so validation rewards any strength weak
    enough to use the feature, while the strongest (W ~ 0) predicts the majority class 0 and scores 50%.
    Test: only class-0 images, but at x=+2: the feature-using probes score ~0%, the strongest one 100%.
    A probe tuned on test would pick the strongest strength; one tuned on validation cannot."""
    rng = np.random.default_rng(1)
    noise = lambda n: 0.3 * rng.standard_normal((n, 2))
    train_y = np.array([0] * 60 + [1] * 40)
    train_x = np.stack([np.where(train_y == 0, -2.0, 2.0), np.zeros(100)], 1) + noise(100)
    val_y = np.array([0] * 30 + [1] * 30)
    val_x = np.stack([np.where(val_y == 0, -2.0, 2.0), np.zeros(60)], 1) + noise(60)
    test_y = np.zeros(50, np.int64)
    test_x = np.stack([np.full(50, 2.0), np.zeros(50)], 1) + noise(50)
    return train_x, train_y, val_x, val_y, test_x, test_y


def test_strength_is_chosen_on_validation_not_test():
    train_x, train_y, val_x, val_y, test_x, test_y = _validation_vs_test_case()
    grid = (1e-2, 1e6, 9)
    by_val, val_scores = lp.select_l2(train_x, train_y, val_x, val_y, grid=grid, refine_steps=0)
    by_test, test_scores = lp.select_l2(train_x, train_y, test_x, test_y, grid=grid, refine_steps=0)
    # The two splits disagree: validation wants a usable feature, test the majority-class probe.
    assert val_scores[by_val] == 1.0 and val_scores[max(val_scores)] == 0.5
    assert by_test == max(test_scores) and test_scores[by_test] == 1.0
    assert by_val < by_test

    result = lp.linear_probe(train_x, train_y, test_x, test_y, val_x=val_x, val_y=val_y, grid=grid,
                             refine_steps=0)
    assert result.l2 == by_val and result.val_top1 == 1.0
    assert result.test_top1 <= 0.05  # what the validation-chosen probe honestly scores on this test set

    # And the choice does not move whatever the test split holds.
    other = lp.linear_probe(train_x, train_y, -test_x, 1 - test_y, val_x=val_x, val_y=val_y, grid=grid,
                            refine_steps=0)
    assert other.l2 == result.l2 and other.val_scores == result.val_scores


def test_refinement_and_ties_prefer_stronger_regularisation():
    rng = np.random.default_rng(2)
    centers = 4.0 * rng.standard_normal((3, 8))
    x, y = _clusters(150, centers, rng)
    vx, vy = _clusters(60, centers, rng)
    chosen, scores = lp.select_l2(x, y, vx, vy, grid=(1e-3, 1e3, 4), refine_steps=2)
    assert len(scores) > 4  # refined between grid points
    best = max(scores.values())
    assert scores[chosen] == best and chosen == max(l2 for l2, s in scores.items() if s == best)


def test_stratified_split_and_bad_inputs():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 1)
    fit, val = lp.stratified_split(labels, 0.2, seed=3)
    assert len(np.intersect1d(fit, val)) == 0 and len(fit) + len(val) == 16
    assert np.bincount(labels[val], minlength=3).tolist() == [2, 1, 0]
    with pytest.raises(ValueError, match="val_fraction"):
        lp.stratified_split(labels, 1.5)
    with pytest.raises(ValueError, match="l2_grid"):
        lp.select_l2(np.zeros((4, 2)), np.array([0, 1, 0, 1]), np.zeros((2, 2)), np.array([0, 1]), grid=(0, 1, 3))


def test_linear_probe_evaluator_on_synthetic_scenes():
    """The kind end to end: datasets from specs, embedding in padded batches, labels aligned, metrics."""
    import jax
    import jax.numpy as jnp

    from softalign.data.pipeline import default_data_config
    from softalign.evaluation import suite

    class _Config:
        data = default_data_config()
        eval_batch_size = 64

    _Config.data.image_size = 16
    spec = lambda split, n: dict(type="synthetic", split=split, num_examples=n, attribute="color")
    evals = {"probe": dict(kind="linear_probe", train=spec("train", 160), test=spec("heldout", 96),
                           l2_grid=(1e-3, 1e3, 4), refine_steps=0)}
    (ev,) = suite.build_evaluators(_Config, tokenizer=None, evals=evals)

    @jax.jit
    def colour_features(images):  # Mean of the brightest pixels: the object's colour.
        flat = images.reshape(images.shape[0], -1, 3)
        weight = jax.nn.softmax(4.0 * flat.sum(-1), axis=1)[..., None]
        return jnp.concatenate([(weight * flat).sum(1), flat.mean(1)], axis=1)

    metrics = ev.run(colour_features, None)
    assert ev.chance["top1"] == pytest.approx(1 / 8)
    assert metrics["top1"] > 0.5 and 0 <= metrics["mean_per_class_recall"] <= 1
    assert -3 <= metrics["log10_l2"] <= 3 and "skipped_images" not in metrics
