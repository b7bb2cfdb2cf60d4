"""SigLIP's sigmoid loss against CLIP's InfoNCE at batch 32, 128 and 512, at equal examples seen (the demo's
38,400 pairs: 1200, 300 and 75 steps; warmup 10% of them), no PSD, so the loss is the only difference:

    python -m softalign.sweep launch --sweep=configs/sweeps/siglip_batch.py --root=/tmp/sweep-siglip --seeds=0,1,2
    python -m softalign.sweep aggregate --root=/tmp/sweep-siglip --x=batch --series=method \\
        --metrics='heldout/i2t_R@5,heldout/t2i_R@5,truth/*R@5,color/top1'

SigLIP's claim (Zhai et al., 2023, Fig. 2): the sigmoid loss beats softmax at small batch, and the gap closes as the
batch grows. ``siglip`` is configs/siglip_demo.py (t' = log 10, b = -10); ``infonce`` is configs/clip_baseline.py.
The learning rate (2e-3) is the demo's at every batch size.
"""

import ml_collections

from softalign.config.schema import demo_config
from softalign.sweep import grid

EXAMPLES = 300 * 128  # the demo's budget
METHODS = {"infonce": {"objective.name": "infonce"},
           "siglip": {"objective.name": "siglip", "model.logit_scale_init": 10.0}}
BATCHES = {b: {"batch_size": b, "num_steps": EXAMPLES // b, "optim.warmup_steps": EXAMPLES // b // 10,
               "log_every": min(50, EXAMPLES // b)}
           for b in (32, 128, 512)}


def get_config() -> ml_collections.ConfigDict:
    """configs/clip_baseline.py (the demo without PSD), a checkpoint only at the end."""
    c = demo_config()
    c.psd.alpha_max = 0.0
    c.psd.teacher = "self"
    c.checkpoint_every = 10_000
    c.keep_checkpoints = 1
    return c


def get_sweep(seeds=(0,)) -> list[grid.Run]:
    """Both losses at each batch size, seed by seed, so a partial sweep has whole seeds."""
    runs = []
    for seed in seeds:
        runs += grid.product(batch=BATCHES, method=METHODS, seed=[seed])
    return grid.combine(runs)
