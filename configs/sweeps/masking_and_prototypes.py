"""The claims of FLIP, A-CLIP and ProtoCLIP on the demo, each against its own baseline at the demo budget.

    python -m softalign.sweep launch --sweep=configs/sweeps/masking_and_prototypes.py --root=/tmp/sweep-mp \\
        --seeds=0,1,2
    python -m softalign.sweep aggregate --root=/tmp/sweep-mp --x=study \\
        --metrics='heldout/i2t_R@5,heldout/t2i_R@5,color/top1,shape/top1,color_probe/top1,shape_probe/top1'

Three studies, 8 runs per seed, every run the demo model (300 steps at batch 128 unless said):
- ``mask``: A-CLIP's claim, attentive against random masking at keep 0.5 (equal steps), and the unmasked run;
  all with the demo's EMA teacher, which the attentive mask reads its attention from.
- ``flip``: FLIP's claim, random masking at ratio 0.5 given the unmasked run's wall-clock: 350 steps, from the
  masked step's measured time (0.856 of the unmasked, benchmarks/masking.py); each run's done.json has its time.
- ``proto``: ProtoCLIP's claim, the prototype loss against CLIP (both ``psd.alpha_max=0`` on the memory bank's
  12,800-record split of configs/protoclip_demo.py) on the linear probes and zero-shot, with clean captions and
  with caption noise 0.5.
"""

import ml_collections

from softalign.config.schema import demo_config
from softalign.sweep import grid

FLIP_STEPS = 350   # 300 / 0.856: the masked step's time against the unmasked one (benchmarks/masking.py)
PROTO = {"objective.num_prototypes": 64, "objective.episode_steps": 50, "psd.teacher": "memory",
         "psd.alpha_max": 0.0, "data.train_size": 12_800}   # configs/protoclip_demo.py

MASK = {"unmasked": {},
        "random": {"model.vision.mask_ratio": 0.5},
        "attentive": {"model.vision.mask_ratio": 0.5, "model.vision.mask": "attentive"}}
FLIP = {"random-equal-time": {"model.vision.mask_ratio": 0.5, "num_steps": FLIP_STEPS}}
PROTOS = {"clip": PROTO, "protoclip": {**PROTO, "objective.name": "protoclip"}}


def _probe(attribute: str) -> dict:
    return dict(kind="linear_probe", every=0,
                train=dict(type="synthetic", split="train", num_examples=3000, attribute=attribute),
                test=dict(type="synthetic", split="heldout", num_examples=1000, attribute=attribute))


def get_config() -> ml_collections.ConfigDict:
    """configs/demo.py with zero-shot and linear probes on colour and shape."""
    c = demo_config()
    c.checkpoint_every = 400
    c.keep_checkpoints = 1
    c.evals = ml_collections.ConfigDict(dict(
        heldout=dict(kind="retrieval", split="heldout", every=0),
        color=dict(kind="synthetic_zeroshot", attribute="color", num_examples=1000, every=0),
        shape=dict(kind="synthetic_zeroshot", attribute="shape", num_examples=1000, every=0),
        color_probe=_probe("color"), shape_probe=_probe("shape")))
    return c


def get_sweep(seeds=(0,)) -> list[grid.Run]:
    """The three studies (module docstring), seed by seed, so a partial sweep has whole seeds."""
    runs = []
    for seed in seeds:
        runs += grid.product(study=grid.axis("study", {"mask": {}}), method=MASK, seed=[seed])
        runs += grid.product(study=grid.axis("study", {"flip": {}}), method=FLIP, seed=[seed])
        runs += grid.product(study=grid.axis("study", {"proto": {}}), method=PROTOS, noise=[0.0, 0.5], seed=[seed])
    return grid.combine(runs)
