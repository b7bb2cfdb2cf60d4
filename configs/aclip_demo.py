"""The demo with A-CLIP's attentive mask: the student keeps the 8 of its 16 image patches that the EMA teacher's
[cls] token attends to most (head- and layer-averaged, on the full image); evaluation sees every patch.

    python -m softalign.main --config=configs/aclip_demo.py --workdir=/tmp/aclip-demo

Only the attentive token removal is built: no extra views, no SimCLR/BYOL terms (docs/method.md, "A-CLIP").
"""

from softalign.config.schema import demo_config


def get_config():
    c = demo_config()
    c.model.vision.mask = "attentive"
    c.model.vision.mask_ratio = 0.5
    return c
