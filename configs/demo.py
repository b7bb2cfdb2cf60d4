"""Demo: a ~1.4M-parameter CLIP trained with PSD (EMA teacher) on the embedded synthetic scenes, ~3 min on 2 CPU cores.

    python -m softalign.main --config=configs/demo.py --workdir=/tmp/sa-demo
"""

from softalign.config.schema import demo_config


def get_config():
    return demo_config()
