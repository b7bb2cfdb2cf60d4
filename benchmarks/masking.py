"""Train-step time with FLIP's patch masking (``model.vision.mask_ratio``) and A-CLIP's attentive mask and recipe
against the unmasked step.

Builds the jitted train step of a config (default: the demo, PSD with the EMA teacher) for each mask ratio, plus
the one-hot-einsum form of the patch gather at the middle ratio (``--gathers``) and, with ``--aclip`` (default on),
A-CLIP's attentive mask at 0.5 alone and its whole recipe (two masked views, SimCLR and BYOL heads as in
configs/aclip_demo.py), compiles them all, then runs
``--rounds`` rounds in which every variant runs ``--steps-per-round`` steps in turn (order rotated each round).
Each variant's time is taken relative to the unmasked step of the same round; the table gives the medians.

    python benchmarks/masking.py                       # the demo model, batch 128, ~3 min on 2 CPU cores
    python benchmarks/masking.py --ratios 0,0.5 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from vs_open_clip import cpu_model  # noqa: E402  (this folder is on sys.path when run as a script)

from softalign.config.schema import demo_config  # noqa: E402
from softalign.models import build_model, vit  # noqa: E402
from softalign.objectives.registry import make_teacher  # noqa: E402
from softalign.parallel import sharding  # noqa: E402
from softalign.training.optim import make_optimizer  # noqa: E402
from softalign.training.step import (  # noqa: E402
    build_train_step,
    create_state,
    jit_train_step,
    with_objective_params,
)

TAKE = vit.gather_patches
ATTENTIVE = {"mask": "attentive"}
RECIPE = {"mask": "attentive", "aclip": dict(views=2, simclr_weight=1.0, byol_weight=2.0, head_hidden=512,
                                             head_dim=128)}  # configs/aclip_demo.py


def onehot_gather(x: jax.Array, idx: jax.Array) -> jax.Array:
    """The alternative form: a one-hot (n, k, L) matrix times the tokens (exact in float32)."""
    return jnp.einsum("nkl,nlw->nkw", jax.nn.one_hot(idx, x.shape[1], dtype=x.dtype), x)


def build(ratio: float, gather, batch_size: int, seed: int, aclip: dict | None = None):
    """A compiled step, its state and a batch for one variant (``aclip``: the mask type and ``config.aclip``)."""
    c = demo_config()
    c.batch_size = batch_size
    c.psd.teacher = "ema"  # a teacher forward to mask too; the memory teacher would need its host bank here
    c.model.vision.mask_ratio = ratio
    if aclip:
        c.model.vision.mask = aclip["mask"]
        c.aclip.update(aclip.get("aclip", {}))
    c.model.text.update(vocab_size=1024, eot_id=2)
    vit.gather_patches = gather  # read when the step is traced, below
    mesh = sharding.make_mesh(1)
    model = build_model(c.model)
    tx, lr = make_optimizer(c.optim, c.num_steps)
    fn, _, objective = build_train_step(c, model=model, mesh=mesh, tx=tx, lr_schedule=lr)
    rng = np.random.default_rng(seed)
    size, length = c.model.vision.image_size, c.model.text.context_length
    batch = {"image": rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
             "tokens": np.concatenate([rng.integers(3, 1024, (batch_size, length - 1)),
                                       np.full((batch_size, 1), 2)], 1).astype(np.int32),
             "index": np.arange(batch_size, dtype=np.int32)}
    params = model.init(jax.random.key(seed), batch["image"][:1], batch["tokens"][:1])["params"]
    state = create_state(with_objective_params(params, objective), tx, make_teacher(c.psd), seed)
    shardings = sharding.state_sharding(mesh, state)
    step = jit_train_step(fn, mesh, shardings)
    state = jax.device_put(state, shardings)
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    state, m, _ = step(state, batch)  # compile + one step
    jax.block_until_ready(m)
    vit.gather_patches = TAKE
    return step, state, batch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ratios", default="0,0.25,0.5,0.75")
    p.add_argument("--gathers", default="0.5", help="ratios also timed with the one-hot gather ('' for none)")
    p.add_argument("--aclip", type=int, default=1, help="1: also time A-CLIP's attentive mask and recipe at 0.5")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    ratios = [float(r) for r in a.ratios.split(",")]
    variants = {f"r={r:g} take": (r, TAKE, None) for r in ratios}
    variants.update({f"r={float(r):g} one-hot": (float(r), onehot_gather, None) for r in a.gathers.split(",") if r})
    if a.aclip:
        variants.update({"A-CLIP mask 0.5": (0.5, TAKE, ATTENTIVE), "A-CLIP recipe": (0.5, TAKE, RECIPE)})
    base = f"r={ratios[0]:g} take"
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores visible), jax {jax.__version__}, backend "
          f"{jax.default_backend()}; demo model, batch {a.batch}, "
          f"{demo_config().model.vision.image_size // demo_config().model.vision.patch_size}^2 patches", flush=True)
    built = {}
    for name, (r, g, aclip) in variants.items():
        t = time.perf_counter()
        built[name] = list(build(r, g, a.batch, a.seed, aclip))
        print(f"  compiled {name} in {time.perf_counter() - t:.1f} s", flush=True)
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    ratio_to_base: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(a.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        this = {}
        for n in order:
            step, state, batch = built[n]
            t = time.perf_counter()
            for _ in range(a.steps_per_round):
                state, m, _ = step(state, batch)
            jax.block_until_ready((state, m))
            built[n][1] = state
            this[n] = (time.perf_counter() - t) / a.steps_per_round
        for n in names:
            times[n].append(this[n])
            ratio_to_base[n].append(this[n] / this[base])
    print(f"\n{'variant':<16} {'kept patches':>12} {'ms/step (median)':>17} {'vs unmasked':>12}")
    views = {n: 2 if v[2] and v[2].get("aclip") else 1 for n, v in variants.items()}
    grid = (demo_config().model.vision.image_size // demo_config().model.vision.patch_size) ** 2
    for n in names:
        r = variants[n][0]
        kept = f"{int(grid * (1 - r))}" + (f" x {views[n]}" if views[n] > 1 else "")
        print(f"{n:<16} {kept:>12} {1e3 * statistics.median(times[n]):>17.1f} "
              f"{statistics.median(ratio_to_base[n]):>12.3f}")


if __name__ == "__main__":
    main()
