"""TinyCLIP's multi-stage progressive compression on the demo: each stage inherits the previous stage's weights
and distills from the original teacher (as TinyCLIP's 75 -> 50 stage inherits from its 61M model and mimics ViT-B/32).

The stage is the config argument: 75, 50 or 25 (about that percentage of the demo's 1.31M parameters):

    python -m softalign.main --config=configs/demo.py --workdir=/tmp/tc/100
    prev=/tmp/tc/100
    for s in 75 50 25; do
      python -m softalign.main --config=configs/tinyclip_stages.py:$s --workdir=/tmp/tc/$s \
          --config.distill.teacher=/tmp/tc/100 --config.distill.inherit_from=$prev || break
      prev=/tmp/tc/$s
    done

Stages keep the teacher's head width (32) and shrink depth, then width: 75: 128 wide x 2 deep (70% of the
parameters), 50: 96 x 2 (41%), 25: 64 x 2 (19%). Each stage is the demo's 300 steps.
"""

from softalign.config.schema import demo_config

STAGES = {"75": (128, 2), "50": (96, 2), "25": (64, 2)}  # width, depth of both towers; embed_dim = width


def get_config(stage: str = "50"):
    if stage not in STAGES:
        raise ValueError(f"tinyclip_stages.py:{stage}: the stage must be one of {sorted(STAGES)}")
    width, depth = STAGES[stage]
    c = demo_config()
    c.objective.name = "distill"
    c.distill.alpha = 1.0
    c.distill.inherit = True  # from distill.inherit_from (the previous stage), or the teacher when it is empty
    c.model.embed_dim = width
    for tower in (c.model.vision, c.model.text):
        tower.update(width=width, depth=depth, num_heads=width // 32)
    c.psd.alpha_max = 0.0  # psd.* does not apply to distill
    c.psd.teacher = "self"
    return c
