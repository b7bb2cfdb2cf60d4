"""A-CLIP's recipe on the demo, piece by piece, at equal steps (300 at batch 128, the demo's EMA teacher):

    python -m softalign.sweep launch --sweep=configs/sweeps/aclip_recipe.py --root=/tmp/sweep-aclip --seeds=0,1,2
    python -m softalign.sweep aggregate --root=/tmp/sweep-aclip --x=method \\
        --metrics='heldout/i2t_R@5,heldout/t2i_R@5,color/top1,shape/top1'

- ``mask``: the attentive mask alone (keep 0.5 of the full image; configs/aclip_demo.py with views=1, no terms);
- ``views``: two random resized crops, each masked by the teacher's attention read through its crop, InfoNCE
  averaged over them, no self-supervised terms;
- ``views+byol`` and ``views+simclr``: the views with one of the two terms (BYOL at weight 2, SimCLR at 1);
- ``recipe``: A-CLIP's whole recipe (configs/aclip_demo.py): the views plus SimCLR (weight 1) and BYOL (weight 2);
- ``recipe-ref``: the same with SimCLR as the released code calls it, view 1 against itself.
"""

import ml_collections

from softalign.config.schema import demo_config
from softalign.sweep import grid

ATTENTIVE = {"model.vision.mask": "attentive", "model.vision.mask_ratio": 0.5,
             "aclip.head_hidden": 512, "aclip.head_dim": 128}   # configs/aclip_demo.py
RECIPE = {**ATTENTIVE, "aclip.views": 2, "aclip.simclr_weight": 1.0, "aclip.byol_weight": 2.0}
METHODS = {"mask": ATTENTIVE,
           "views": {**ATTENTIVE, "aclip.views": 2},
           "views+byol": {**ATTENTIVE, "aclip.views": 2, "aclip.byol_weight": 2.0},
           "views+simclr": {**ATTENTIVE, "aclip.views": 2, "aclip.simclr_weight": 1.0},
           "recipe": RECIPE,
           "recipe-ref": {**RECIPE, "aclip.simclr_pairs": "reference"}}


def get_config() -> ml_collections.ConfigDict:
    """configs/demo.py, one checkpoint kept."""
    c = demo_config()
    c.checkpoint_every = 400
    c.keep_checkpoints = 1
    return c


def get_sweep(seeds=(0,)) -> list[grid.Run]:
    """The six methods, seed by seed, so a partial sweep has whole seeds."""
    runs = []
    for seed in seeds:
        runs += grid.product(method=METHODS, seed=[seed])
    return grid.combine(runs)
