"""The demo run as plain CLIP: alpha_max = 0 is exactly symmetric InfoNCE, and no teacher is run.

    python -m softalign.main --config=configs/clip_baseline.py --workdir=/tmp/sa-clip
"""

from softalign.config.schema import demo_config


def get_config():
    c = demo_config()
    c.psd.alpha_max = 0.0
    c.psd.teacher = "self"
    return c
