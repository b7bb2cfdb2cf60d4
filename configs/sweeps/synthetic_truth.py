"""What are PSD's soft targets worth? The synthetic scenes, where the many-to-many truth is known exactly
(softalign/data/scene_truth.py), so every method can be scored against it and against an oracle.

    python -m softalign.sweep launch --sweep=configs/sweeps/synthetic_truth.py --root=/tmp/sweep-truth
    python -m softalign.sweep aggregate --root=/tmp/sweep-truth --x=noise,size \\
        --metrics='truth/i2t_R@1,truth/i2t_mAP,truth/paired_i2t_R@1,truth/t2i_mAP,probe/mean_top1,color/top1'

Grid (63 runs per seed; the demo model and budget: 300 steps at batch 128 for every run, about 2-4 minutes each
on 2 CPU cores, so about 3-4 hours a seed; ``--seeds=0,1,2`` for spreads):
- methods: CLIP (alpha_max=0); PSD with the ema, memory, self (tau_d = 0.5) and snapshot teachers; PSD with
  the ``oracle`` teacher (soft targets uniform over the batch's true pairs, same alpha/rho/ramp as the other
  teachers); ``oracle-mp``: CLIP's loss with every true pair a positive (objective.multi_positive, no soft
  targets), to tell "soft targets" apart from "knowing the false negatives";
- caption noise {0, 0.3, 0.6};
- train_size {2,000, 20,000, 200,000} scenes at equal steps (38,400 pairs seen: 19 epochs, ~2 epochs, 0.19 of
  an epoch). At 200,000 no record is seen twice, so the memory teacher never has a memory and equals CLIP there.

Seeds vary the training randomness (``seed``: init, shuffle, augmentation, S); the training scenes come from
``data.seed`` = 0 for every run, and the held-out scenes from their own seed, ``data.heldout_seed`` =
HELDOUT_SEED, so every run is scored on the same 1,000 held-out scenes, none drawn from the training stream.
Evaluations: paired retrieval (``heldout``), multi-positive retrieval and mAP (``truth``), the compositional probe
(``probe``), zero-shot colour and shape; the ``train/truth_*`` target-quality metrics are logged every 50 steps.
A quick check of the plumbing (2 runs): ``--only=method=oracle,noise=0.6,size=2000,
--only=method=oracle-mp,noise=0.6,size=2000, -- --config.num_steps=4`` (the trailing commas keep size=20000 out).
"""

import ml_collections

from softalign.config.schema import demo_config
from softalign.sweep import grid

NUM_STEPS = 300          # the demo budget
SNAPSHOT_EVERY = 60      # the snapshot teacher is refreshed 5 times in a run
HELDOUT_SEED = 1000      # the held-out split's own data seed (training uses data.seed = 0)
TRAIN_SIZES = (2_000, 20_000, 200_000)
NOISE = (0.0, 0.3, 0.6)

METHODS = {
    "clip": {"psd.alpha_max": 0.0, "psd.teacher": "self"},            # plain InfoNCE, no teacher pass
    "psd-ema": {"psd.teacher": "ema"},
    "psd-memory": {"psd.teacher": "memory"},
    "psd-self": {"psd.teacher": "self", "psd.temperature": 0.5},       # the student's own logits, sharpened
    "psd-snapshot": {"psd.teacher": "snapshot"},
    "oracle": {"psd.teacher": "oracle"},                               # soft targets from the ground truth
    "oracle-mp": {"psd.alpha_max": 0.0, "psd.teacher": "self", "objective.multi_positive": True},
}


def get_config() -> ml_collections.ConfigDict:
    """configs/demo.py (the ~1.4M-parameter model, 32 px scenes, 300 steps) with the ground-truth evaluations."""
    c = demo_config()
    c.num_steps = NUM_STEPS
    c.data.heldout_seed = HELDOUT_SEED
    c.psd.snapshot_every = SNAPSHOT_EVERY
    c.checkpoint_every = NUM_STEPS
    c.keep_checkpoints = 1
    c.evals = ml_collections.ConfigDict(dict(
        heldout=dict(kind="retrieval", split="heldout", every=0),
        truth=dict(kind="multi_positive_retrieval", split="heldout", max_examples=0, every=0),   # 0: all
        probe=dict(kind="compositional_probe", split="heldout", num_examples=0, every=0),
        color=dict(kind="synthetic_zeroshot", attribute="color", num_examples=1000, every=0),
        shape=dict(kind="synthetic_zeroshot", attribute="shape", num_examples=1000, every=0),
    ))
    return c


def get_sweep(seeds=(0,)) -> list[grid.Run]:
    """methods x caption noise x train size x seeds (see the module docstring)."""
    return grid.product(method=METHODS, noise=list(NOISE),
                        size=grid.axis("size", list(TRAIN_SIZES), key="data.train_size"), seed=list(seeds))
