"""Flickr8k scaling sweep: method x caption noise x data size, a small ViT-Ti-like CLIP, equal steps and batch
for every method: 800 steps at batch 128 (~17 epochs of the 6,091 training photos). A run takes 5.2-5.9 minutes
on 2 quiet CPU cores with the default bfloat16 compute (start-up, compilation and the final evaluation included);
the 17 runs took 98 minutes in all (docs/results.md). The earlier 150-step version of this study is git
commit 736dec1.

Prepare the data once (ArrayRecord + a BPE fitted to the training captions; docs/data.md), then launch:

    python -m softalign.data.convert --source=folder --input=../shared/data/flickr8k --output_dir=/tmp/f8k-ar
    python -m softalign.data.tokenizer --source=arrayrecord --path=/tmp/f8k-ar --vocab_size=2048 \\
        --context_length=32 --output=/tmp/f8k-ar/tokenizer.json
    python -m softalign.sweep launch --sweep=configs/sweeps/flickr8k.py --root=/tmp/sweep-f8k-long
    python -m softalign.sweep aggregate --root=/tmp/sweep-f8k-long

Other data paths: append ``-- --config.data.path=DIR --config.tokenizer.path=DIR/tokenizer.json``. More
seeds for every cell: ``--seeds=0,1,2`` (runs already finished are kept and skipped). Another PSD teacher in the
main grid (after the teacher comparison): ``--arg=best=snapshot``.

Grid (17 runs with the default seeds, in launch order):
- {clip, psd-<best>} x caption noise {0, 0.2, 0.5} on all the training data;
- the headline pair again at noise 0.5 with seeds 1 and 2 (``extra_seeds``), for a seed spread;
- {clip, psd-<best>} at noise 0.5 on data fractions {0.1, 0.3} (nested seeded subsets of the 6,091 images);
- teachers {ema, snapshot, self with tau_d = 0.5, memory} at noise 0.5.
Evaluations: retrieval on Flickr8k val (1,000 images, 5 captions each) and zero-shot CIFAR-10 test (10,000 images).
"""

import os

import ml_collections

from softalign.config.schema import base_config
from softalign.sweep import grid

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")   # ../shared/data beside the checkout
NUM_STEPS = 800       # ~17 epochs of the 6,091 training photos; 5.2-5.9 min a run on 2 quiet cores
SNAPSHOT_EVERY = 160  # the snapshot teacher is refreshed 5 times in a run

METHODS = {
    "clip": {"psd.alpha_max": 0.0, "psd.teacher": "self"},            # plain InfoNCE, no teacher pass
    "psd-ema": {"psd.teacher": "ema"},
    "psd-snapshot": {"psd.teacher": "snapshot", "psd.snapshot_every": SNAPSHOT_EVERY},
    "psd-self": {"psd.teacher": "self", "psd.temperature": 0.5},       # the student's own logits, sharpened
    "psd-memory": {"psd.teacher": "memory"},
}
TEACHERS = ("psd-ema", "psd-snapshot", "psd-self", "psd-memory")


def get_config() -> ml_collections.ConfigDict:
    """ViT patch 8 at 48 px (width 128, depth 4, 2 heads), text width 128, depth 4, context 32; batch 128."""
    c = base_config()
    m = c.model
    m.embed_dim = 128
    m.vision.update(image_size=48, patch_size=8, width=128, depth=4, num_heads=2)   # 36 patches
    m.text.update(context_length=32, width=128, depth=4, num_heads=2)
    c.data.source = "arrayrecord"
    c.data.path = "/tmp/f8k-ar"                     # the converter's output (see above)
    c.data.train_split, c.data.heldout_split = "train", "val"
    c.data.image_size = 48
    c.data.crop_scale = (0.5, 1.0)                  # 6k photos: stronger crops than the synthetic demo
    c.tokenizer.path = "/tmp/f8k-ar/tokenizer.json"  # one vocabulary for every run
    c.tokenizer.vocab_size = 2048
    c.batch_size = 128
    c.eval_batch_size = 500
    c.num_steps = NUM_STEPS
    c.optim.update(lr=1e-3, warmup_steps=NUM_STEPS // 10, weight_decay=0.1)
    c.psd.update(alpha_max=0.5, subset_fraction=0.5, teacher="ema", snapshot_every=SNAPSHOT_EVERY,
                 ema_momentum=0.99)                 # the library defaults; an averaging horizon of ~100 steps
    c.log_every = 50
    c.checkpoint_every = 200
    c.keep_checkpoints = 1
    c.evals = ml_collections.ConfigDict(dict(
        flickr8k_val=dict(kind="retrieval", every=0, dataset=dict(
            type="captions", path=os.path.join(SHARED_DATA, "flickr8k"), split="val", name="flickr8k-val",
            max_examples=0)),                   # 0: all; e.g. 100 for a quick check
        cifar10=dict(kind="zeroshot", every=0, dataset=dict(
            type="folder", path=os.path.join(SHARED_DATA, "cifar10", "test"), name="cifar10", max_examples=0)),
    ))
    return c


def get_sweep(seeds=(0,), best: str = "ema", extra_seeds=(1, 2)) -> list[grid.Run]:
    """The grid above, in the order it runs; ``best`` is the PSD teacher of the main grid and the data-size runs,
    ``extra_seeds`` repeat the headline pair (CLIP and PSD-``best`` at noise 0.5) for a seed spread."""
    seeds = list(seeds)
    main = grid.pick(METHODS, "clip", f"psd-{best}")
    return grid.combine(
        grid.product(method=main, noise=[0.0, 0.2, 0.5], seed=seeds),
        grid.product(method=main, noise=[0.5], seed=list(extra_seeds)),   # combine() drops repeats
        grid.product(method=main, noise=[0.5], fraction=[0.1, 0.3], seed=seeds),
        grid.product(method=grid.pick(METHODS, *TEACHERS), noise=[0.5], seed=seeds),
    )
