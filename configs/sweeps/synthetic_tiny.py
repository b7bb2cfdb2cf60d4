"""CI-scale sweep: a tiny CLIP on synthetic scenes for 4 steps, so a whole grid runs in about a minute on 2 CPU
cores. It checks the sweep tooling (tests/test_sweep.py), not which method wins.

    python -m softalign.sweep launch --sweep=configs/sweeps/synthetic_tiny.py --root=/tmp/sw-tiny --parallel=2
    python -m softalign.sweep aggregate --root=/tmp/sw-tiny

Grid: {clip, psd-ema} x caption noise {0, 0.5} x seeds, plus psd-ema on half the data at noise 0.5 (5 runs).
"""

import ml_collections

from softalign.config.schema import base_config
from softalign.sweep import grid

METHODS = {
    "clip": {"psd.alpha_max": 0.0, "psd.teacher": "self"},   # plain InfoNCE, no teacher pass
    "psd-ema": {"psd.teacher": "ema"},
}


def get_config() -> ml_collections.ConfigDict:
    """The tiny model and data of tests/tiny.py, 4 steps, retrieval and zero-shot on 64 held-out examples."""
    c = base_config()
    m = c.model
    m.embed_dim = 16
    m.vision.update(image_size=8, patch_size=4, width=32, depth=1, num_heads=2)
    m.text.update(context_length=24, width=32, depth=1, num_heads=2)
    c.data.update(image_size=8, train_size=400, heldout_size=64, num_threads=0, prefetch_buffer_size=1,
                  batch_prefetch=0)
    c.tokenizer.update(vocab_size=384, num_captions=1000)
    c.batch_size = 16
    c.eval_batch_size = 64
    c.num_steps = 4
    c.optim.warmup_steps = 1
    c.log_every = 2
    c.checkpoint_every = 4
    c.psd.subset_groups = 1
    c.evals = ml_collections.ConfigDict(dict(
        heldout=dict(kind="retrieval", split="heldout", every=0),
        color=dict(kind="synthetic_zeroshot", attribute="color", num_examples=64, every=0),
    ))
    return c


def get_sweep(seeds=(0,)) -> list[grid.Run]:
    """{clip, psd-ema} x noise {0, 0.5} x seeds, and psd-ema at noise 0.5 on data fractions {0.5, 1}."""
    return grid.combine(
        grid.product(method=METHODS, noise=[0.0, 0.5], seed=list(seeds)),
        grid.product(method=grid.pick(METHODS, "psd-ema"), noise=[0.5], fraction=[0.5, 1.0], seed=list(seeds)),
    )
