"""The demo with ProtoCLIP's prototype loss (``objective.name='protoclip'``, docs/method.md): InfoNCE plus the
cross-modal prototype term over 64 k-means clusters of the memory bank, re-clustered every 50 steps.

    python -m softalign.main --config=configs/protoclip_demo.py --workdir=/tmp/protoclip-demo

The prototypes come from the memory teacher's bank of every record's latest embeddings, so records must come back:
the train split is cut to 12,800 records (100 steps an epoch; the demo's 100,000 would never repeat in 300 steps).
No PSD soft targets (``psd.alpha_max=0``): the run is CLIP + prototypes.
"""

from softalign.config.schema import demo_config


def get_config():
    c = demo_config()
    c.objective.name = "protoclip"
    c.objective.num_prototypes = 64
    c.objective.episode_steps = 50
    c.psd.teacher = "memory"
    c.psd.alpha_max = 0.0
    c.data.train_size = 12_800
    return c
