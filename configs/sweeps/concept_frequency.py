"""Does zero-shot accuracy per concept grow log-linearly with its training frequency (Udandarao et al., 2024)?
The synthetic scenes with colour frequencies set by ``data.color_weights``: a geometric ladder, each colour a
third as frequent as the one before (a 2,187x range: 3.3 decades), rotated over the colours so that each colour
sits at several rungs and a colour's own difficulty averages out of the slope; plus a uniform control.

    python -m softalign.sweep launch --sweep=configs/sweeps/concept_frequency.py --root=/tmp/sweep-freq --seeds=0,1
    for run in /tmp/sweep-freq/order=*/; do
      python -m softalign.tools.concept_frequency --workdir=$run --concepts=synthetic_color --eval_name=color
    done

Each run's ``concept_frequency/`` then holds the colours' caption counts, their accuracies and the fitted slope.
The demo model and budget (300 steps at batch 128, about 2 minutes a run on 2 CPU cores): 5 runs per seed. The
held-out colour zero-shot set stays uniform (500 single-object scenes per colour, ``per_class`` recalls), so every
colour is scored on equal footing, and the tokenizer is fitted on uniform captions in every run (the synthetic
source's tokenizer corpus ignores the weights), so only the training signal changes.
"""

import ml_collections

from softalign.config.schema import demo_config
from softalign.data.synthetic import COLORS
from softalign.sweep import grid

RATIO = 3.0          # each rung of the ladder is a third as frequent as the one before
SHIFTS = (0, 2, 4, 6)


def ladder(shift: int, ratio: float = RATIO) -> tuple[float, ...]:
    """Colour ``c`` gets weight ``ratio ** -((c + shift) mod 8)``: the ladder rotated by ``shift`` colours."""
    return tuple(float(ratio ** -((c + shift) % len(COLORS))) for c in range(len(COLORS)))


ORDERS = {"uniform": {"data.color_weights": ()},
          **{f"shift{k}": {"data.color_weights": ladder(k)} for k in SHIFTS}}


def get_config() -> ml_collections.ConfigDict:
    """configs/demo.py with per-class colour zero-shot on 4,000 uniform single-object scenes."""
    c = demo_config()
    c.checkpoint_every = c.num_steps
    c.keep_checkpoints = 1
    c.evals = ml_collections.ConfigDict(dict(
        heldout=dict(kind="retrieval", split="heldout", every=0),
        color=dict(kind="synthetic_zeroshot", attribute="color", num_examples=4000, per_class=True, every=0),
        shape=dict(kind="synthetic_zeroshot", attribute="shape", num_examples=1000, every=0),
    ))
    return c


def get_sweep(seeds=(0,)) -> list[grid.Run]:
    """The uniform control and the four rotations of the ladder, x seeds."""
    return grid.product(order=grid.axis("order", ORDERS), seed=list(seeds))
