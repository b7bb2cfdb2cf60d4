"""The demo with A-CLIP's attentive mask: the student keeps the 8 of its 16 image patches that the EMA teacher's
[cls] token attends to most (head- and layer-averaged, on the full image); evaluation sees every patch.

    python -m softalign.main --config=configs/aclip_demo.py --workdir=/tmp/aclip-demo

A-CLIP's whole recipe (two masked random crops, SimCLR between them, BYOL against the EMA projector; heads sized for
this 128-wide model) is four flags away:

    python -m softalign.main --config=configs/aclip_demo.py --workdir=/tmp/aclip-recipe --config.aclip.views=2 \\
        --config.aclip.simclr_weight=1 --config.aclip.byol_weight=2 [--config.aclip.simclr_pairs=reference]

On these scenes the mask alone scored best (3 seeds, docs/results.md, "A-CLIP's recipe, piece by piece"): SimCLR
between the crops kept the contrastive loss at chance, and the crops alone cost accuracy, likely because the
captions state each shape's size and position, which a random crop changes.
"""

from softalign.config.schema import demo_config


def get_config():
    c = demo_config()
    c.model.vision.mask = "attentive"
    c.model.vision.mask_ratio = 0.5
    c.aclip.update(head_hidden=512, head_dim=128)  # used only when a self-supervised term is switched on
    return c
