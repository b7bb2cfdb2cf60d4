"""TinyCLIP's claim on the demo: the quarter-size student of configs/tinyclip_demo.py, held-out R@5 against steps,
with weight inheritance + affinity mimicking against the same student from scratch, mimicking alone (random
init) and inheritance alone (InfoNCE). One teacher (a finished configs/demo.py run) serves every seed:

    python -m softalign.main --config=configs/demo.py --workdir=/tmp/tc-teacher
    python -m softalign.sweep launch --sweep=configs/sweeps/tinyclip_curve.py --root=/tmp/sweep-tinyclip \\
        --seeds=0,1,2 --arg=teacher=/tmp/tc-teacher
    python -m softalign.sweep curves --root=/tmp/sweep-tinyclip --metric=heldout/i2t_R@5 --baseline=scratch

Every run trains 600 steps (twice the demo's; one cosine schedule) and evaluates the held-out retrieval every 50,
so a curve is one run's trajectory. ``curves`` reports, per seed, the step at which each method first reaches the
scratch student's final score, and the speed-up factor (scratch's steps over the method's): TinyCLIP's
"1.4-7.8x faster than from scratch" at equal zero-shot score.
"""

import ml_collections

from softalign.config.schema import demo_config
from softalign.sweep import grid

STEPS = 600
EVAL_EVERY = 50


def methods(teacher: str) -> dict[str, dict]:
    """The four arms; the distillation arms read ``teacher`` (a finished demo run's workdir)."""
    distill = {"objective.name": "distill", "distill.teacher": teacher}
    return {"inherit+distill": {**distill, "distill.inherit": True, "distill.alpha": 1.0},
            "distill": {**distill, "distill.inherit": False, "distill.alpha": 1.0},
            "inherit": {**distill, "distill.inherit": True, "distill.alpha": 0.0},  # InfoNCE from inherited weights
            "scratch": {"objective.name": "infonce"}}


def get_config() -> ml_collections.ConfigDict:
    """configs/tinyclip_demo.py's student (64 wide, 64-d joint space), no PSD, 600 steps, held-out R@5 every 50."""
    c = demo_config()
    c.model.embed_dim = 64
    c.model.vision.update(width=64, num_heads=2)
    c.model.text.update(width=64, num_heads=2)
    c.psd.alpha_max = 0.0
    c.psd.teacher = "self"
    c.num_steps = STEPS
    c.optim.warmup_steps = STEPS // 10
    c.evals.heldout.every = EVAL_EVERY
    c.checkpoint_every = 10_000
    c.keep_checkpoints = 1
    return c


def get_sweep(seeds=(0,), teacher: str = "") -> list[grid.Run]:
    """The four arms, seed by seed, so a partial sweep has whole seeds."""
    if not teacher:
        raise ValueError("tinyclip_curve.py needs --arg=teacher=WORKDIR (a finished configs/demo.py run)")
    runs = []
    for seed in seeds:
        runs += grid.product(method=methods(teacher), seed=[seed])
    return grid.combine(runs)
