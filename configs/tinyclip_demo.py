"""TinyCLIP on the demo: a student with ~1/4 of a finished demo run's parameters, its weights inherited from that
run and trained by affinity mimicking (objective.name='distill', alpha=1) with the run as frozen teacher.

    python -m softalign.main --config=configs/demo.py --workdir=/tmp/tc-teacher
    python -m softalign.main --config=configs/tinyclip_demo.py --workdir=/tmp/tc-student \
        --config.distill.teacher=/tmp/tc-teacher

Student: both towers 64 wide (2 heads of 32, the teacher's head width), 3 deep, a 64-d joint space: every axis
half the teacher's, so the blocks keep 1/4 of their weights (softalign/models/inherit.py). The student reads the
teacher's tokenizer (copied into its workdir), so both see the same token ids.
"""

from softalign.config.schema import demo_config


def get_config():
    c = demo_config()
    c.objective.name = "distill"
    c.distill.alpha = 1.0  # TinyCLIP's default: pure affinity mimicking
    c.distill.inherit = True
    c.model.embed_dim = 64
    c.model.vision.update(width=64, num_heads=2)
    c.model.text.update(width=64, num_heads=2)
    c.psd.alpha_max = 0.0  # the psd.* keys do not apply to distill; no EMA copy of the student either
    c.psd.teacher = "self"
    return c
