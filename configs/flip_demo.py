"""The demo with FLIP's patch masking: the student drops half of its 16 image patches at random in every training
step (``model.vision.mask_ratio=0.5``); evaluation and the EMA teacher see every patch.

    python -m softalign.main --config=configs/flip_demo.py --workdir=/tmp/flip-demo
"""

from softalign.config.schema import demo_config


def get_config():
    c = demo_config()
    c.model.vision.mask_ratio = 0.5
    return c
