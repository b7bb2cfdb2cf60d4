"""The demo run with SigLIP's sigmoid loss instead of InfoNCE (no PSD teacher: the sigmoid loss takes no soft targets).

    python -m softalign.main --config=configs/siglip_demo.py --workdir=/tmp/siglip-demo

SigLIP's initialisation: logit scale 10 (the model's ``logit_scale_init``; CLIP starts at 1/0.07) and bias -10
(``objective.siglip_bias_init``, the default), so the B-1 negatives of each image add little to the first losses.
"""

from softalign.config.schema import demo_config


def get_config():
    c = demo_config()
    c.objective.name = "siglip"
    c.model.logit_scale_init = 10.0
    c.psd.alpha_max = 0.0
    c.psd.teacher = "self"
    return c
