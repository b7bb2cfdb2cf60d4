"""Linear probe: L2-regularised multinomial logistic regression on frozen image embeddings (CLIP's protocol).

1. Embed the train, validation and test images with the frozen image tower.
2. Standardise features with the fitting set's mean and standard deviation.
3. For each regularisation strength on a log-spaced grid (default 1e-6 .. 1e6, one per decade, as CLIP swept),
   fit on train and score top-1 on the validation split; then refine around the best one by halving the
   log-step (``refine_steps`` times, CLIP's "parametric binary search"). Ties go to the stronger regulariser.
4. Refit on train + validation with the chosen strength and score the test split once.

The test split is never looked at before step 4. Without a validation spec, a stratified ``val_fraction`` of the
train split is held out for step 3.

Solver: scikit-learn's ``LogisticRegression(solver='lbfgs')``, warm-started along the grid from strong to weak
regularisation, with one BLAS thread for small problems. Chosen by measurement on this project's (busy) 2-core CPU
box against a jitted optax L-BFGS that fits all 13 strengths at once under ``vmap`` (standardised Gaussian
features; wall time for the whole grid; optax's first call includes compilation):

                          sklearn   optax 1st call   optax 2nd call
    n=5k,  d=64,  C=10:    0.3 s        4.9 s            5.9 s
    n=10k, d=512, C=10:    0.6 s         60 s             30 s
    n=10k, d=512, C=100:   3.3 s         80 s             76 s

The optax fits also stopped early at weak regularisation (validation top-1 up to 11 points lower there), while
sklearn converges to the optimum and needs no compilation, so sklearn is used. (With the default two BLAS threads
on the busy box, the same sklearn fits were 10-100x slower: hence one thread below ``SMALL_PROBLEM``.)

The strength ``l2`` is CLIP's lambda = 1 / sklearn's ``C``: the objective is
``sum_i CE(x_i) + (l2 / 2) * ||W||^2`` (bias not penalised).
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import warnings
from typing import Any, Optional, Sequence

import numpy as np

from softalign.evaluation import base
from softalign.evaluation.datasets import ClassificationData, load_classification

DEFAULT_GRID = (1e-6, 1e6, 13)  # (lowest, highest, points), log-spaced


@dataclasses.dataclass
class ProbeResult:
    """Test scores of the refit probe and how its strength was chosen."""

    test_top1: float
    test_mean_per_class_recall: float
    l2: float  # the chosen strength
    val_top1: float  # validation top-1 at that strength
    val_scores: dict[float, float]  # every strength tried -> validation top-1

    def metrics(self) -> dict[str, float]:
        return {"top1": self.test_top1, "mean_per_class_recall": self.test_mean_per_class_recall,
                "val_top1": self.val_top1, "log10_l2": float(np.log10(self.l2))}


class _Standardizer:
    def __init__(self, x: np.ndarray):
        self.mean = x.mean(axis=0)
        self.scale = np.maximum(x.std(axis=0), 1e-6)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.scale


def _model(l2: float, max_iter: int):
    from sklearn.linear_model import LogisticRegression
    return LogisticRegression(C=1.0 / l2, solver="lbfgs", max_iter=max_iter, tol=1e-4, warm_start=True)


def _fit(model, x: np.ndarray, y: np.ndarray, init=None):
    """Fits `model` (warm-started from `init`, a fitted model with the same classes, if given)."""
    from sklearn.exceptions import ConvergenceWarning
    if init is not None:
        model.coef_, model.intercept_ = init.coef_.copy(), init.intercept_.copy()
    with warnings.catch_warnings(), _blas_threads(x.size * len(np.unique(y))):
        warnings.simplefilter("ignore", ConvergenceWarning)  # Weak regularisation may stop at max_iter: expected.
        return model.fit(x, y)


def _blas_threads(work: int):
    """One BLAS thread for small problems: L-BFGS then runs hundreds of tiny matmuls, where thread hand-offs
    dominate (measured: 0.7 s vs 74 s for 1,000 iterations on 2,000 x 128 features on a busy 2-core box)."""
    if work > SMALL_PROBLEM:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits
    return threadpool_limits(1, user_api="blas")


SMALL_PROBLEM = 50_000_000  # features x classes below which the fits use one BLAS thread


def _accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(model.predict(x) == y))


def stratified_split(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): about `fraction` of each class (at least one when it has >= 2)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        take = int(round(fraction * len(members)))
        take = min(max(take, 1 if len(members) >= 2 else 0), len(members) - 1)
        val.extend(members[:take])
    val_idx = np.sort(np.asarray(val, np.int64))
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx, val_idx


def select_l2(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
              grid: Sequence[float] = DEFAULT_GRID, refine_steps: int = 2, max_iter: int = 1000
              ) -> tuple[float, dict[float, float]]:
    """The strength with the best validation top-1 (ties: the strongest), and every strength's score.

    Sees only train and validation data; fits on standardised train features, strongest first (warm starts).
    """
    lo, hi, num = float(grid[0]), float(grid[1]), int(grid[2])
    if not 0 < lo <= hi or num < 1:
        raise ValueError(f"l2_grid must be (lowest > 0, highest >= lowest, points >= 1), got {tuple(grid)}")
    standardize = _Standardizer(train_x)
    xt, xv = standardize(train_x), standardize(val_x)
    scores: dict[float, float] = {}
    fitted: dict[float, Any] = {}
    model = _model(hi, max_iter)
    for l2 in np.logspace(np.log10(hi), np.log10(lo), num):  # strongest first, each warm-starting the next
        model.set_params(C=1.0 / l2)
        _fit(model, xt, train_y)
        scores[float(l2)] = _accuracy(model, xv, val_y)
        fitted[float(l2)] = _snapshot(model)

    def best() -> float:  # Highest accuracy; among ties the largest strength.
        return max(scores, key=lambda l2: (scores[l2], l2))

    step = (np.log10(hi) - np.log10(lo)) / max(num - 1, 1) / 2
    for _ in range(refine_steps if num > 1 else 0):
        center = best()
        for l2 in (center * 10 ** step, center / 10 ** step):
            if lo <= l2 <= hi and l2 not in scores:
                refined = _fit(_model(l2, max_iter), xt, train_y, init=fitted[center])
                scores[float(l2)] = _accuracy(refined, xv, val_y)
                fitted[float(l2)] = _snapshot(refined)
        step /= 2
    chosen = best()
    return chosen, dict(sorted(scores.items()))


def _snapshot(model):
    """The fitted coefficients only (a warm start for a nearby strength)."""
    return types.SimpleNamespace(coef_=model.coef_.copy(), intercept_=model.intercept_.copy())


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 val_x: Optional[np.ndarray] = None, val_y: Optional[np.ndarray] = None, val_fraction: float = 0.2,
                 grid: Sequence[float] = DEFAULT_GRID, refine_steps: int = 2, max_iter: int = 1000,
                 seed: int = 0) -> ProbeResult:
    """Chooses the strength on validation (given, or a stratified `val_fraction` of train), refits on
    train + validation, and scores the test split (top-1 and mean per-class recall over the classes present)."""
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if val_x is None:
        fit_idx, val_idx = stratified_split(train_y, val_fraction, seed)
        val_x, val_y = train_x[val_idx], train_y[val_idx]
        train_x, train_y = train_x[fit_idx], train_y[fit_idx]
    val_x, val_y = np.asarray(val_x, np.float64), np.asarray(val_y)
    if len(np.unique(train_y)) < 2:
        raise ValueError("the probe's train split needs at least two classes")
    l2, scores = select_l2(train_x, train_y, val_x, val_y, grid=grid, refine_steps=refine_steps,
                           max_iter=max_iter)
    all_x, all_y = np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])
    standardize = _Standardizer(all_x)
    model = _fit(_model(l2, max_iter), standardize(all_x), all_y)
    predicted = model.predict(standardize(test_x))
    hit = predicted == test_y
    recall = float(np.mean([np.mean(hit[test_y == c]) for c in np.unique(test_y)]))
    return ProbeResult(float(np.mean(hit)), recall, l2, scores[l2], scores)


# ----------------------------------------------------------------------------- evaluator


def _align(reference: ClassificationData, other: ClassificationData, where: str) -> np.ndarray:
    """`other`'s labels in `reference`'s class order (matched by class name)."""
    if list(other.classnames) == list(reference.classnames):
        return other.labels
    index = {c: i for i, c in enumerate(reference.classnames)}
    missing = sorted(set(other.classnames) - set(index))
    if missing:
        raise base.ConfigError(f"{where}: classes {missing[:5]} are not in the train split's classes")
    table = np.asarray([index[c] for c in other.classnames], np.int32)
    return np.where(other.labels >= 0, table[np.maximum(other.labels, 0)], -1)


@base.register_evaluator("linear_probe")
def build_linear_probe(name: str, options: Any, ctx: base.EvalContext) -> base.Evaluator:
    """``evals.<name> = {kind: 'linear_probe', train: {...}, test: {...}, val: {...} (optional),
    val_fraction: 0.2, l2_grid: (1e-6, 1e6, 13), refine_steps: 2, max_iter: 1000, seed: 0}``."""
    options = base.options_of(name, options, ("train", "val", "test", "val_fraction", "l2_grid", "refine_steps",
                                              "max_iter", "seed"))
    for key in ("train", "test"):
        if options.get(key) is None:
            raise base.ConfigError(f"evals.{name}.{key}: a classification dataset spec is required")
    splits = {key: load_classification(options[key], ctx.images, where=f"evals.{name}.{key}")
              for key in ("train", "val", "test") if options.get(key) is not None}
    labels = {key: _align(splits["train"], data, f"evals.{name}.{key}") for key, data in splits.items()}
    grid = tuple(options.get("l2_grid") or DEFAULT_GRID)
    settings = dict(val_fraction=float(options.get("val_fraction") or 0.2), grid=grid,
                    refine_steps=int(2 if options.get("refine_steps") is None else options["refine_steps"]),
                    max_iter=int(options.get("max_iter") or 1000), seed=int(options.get("seed") or 0))

    def features(encode_image, key):
        emb, kept = ctx.embed_images(encode_image, splits[key].images, f"{name}: {key} images")
        return emb, labels[key][kept]

    def run(encode_image, encode_text):
        del encode_text
        train_x, train_y = features(encode_image, "train")
        test_x, test_y = features(encode_image, "test")
        val_x, val_y = features(encode_image, "val") if "val" in splits else (None, None)
        result = linear_probe(train_x, train_y, test_x, test_y, val_x=val_x, val_y=val_y, **settings)
        metrics = result.metrics()
        skipped = sum(data.images.skipped for data in splits.values())
        if skipped:
            metrics["skipped_images"] = float(skipped)
        return metrics

    c = len(splits["train"].classnames)
    return base.Evaluator(name, base.every_of(options), run, {"top1": 1 / c, "mean_per_class_recall": 1 / c},
                          num_images=sum(len(d.images) for d in splits.values()))
