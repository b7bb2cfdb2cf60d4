"""Train-step throughput and MFU of one model preset, against a matmul peak measured in the same process.

    python benchmarks/throughput.py --model=ViT-B/16 --batch=256 --dtype=bfloat16      # on a GPU / TPU
    python benchmarks/throughput.py --model=demo --batch=128 --image_size=32 --patch_size=8   # on a CPU

MFU = (FLOPs of one compiled step, from XLA's cost analysis) x steps/s / (measured peak FLOP/s of a large matmul in
the same dtype with f32 accumulation). The PSD variants (the EMA teacher and the default memory teacher, rho = 0.5)
run interleaved with plain CLIP so their ratios are taken side by side. The memory teacher's bank rows are fixed
arrays in the batch here (all rows seen); ``benchmarks/step_overhead.py`` also times the host lookup and write-back.
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

from softalign.config import schema
from softalign.models import build_model, model_preset  # noqa: E402
from softalign.objectives import memory_bank  # noqa: E402
from softalign.parallel import sharding  # noqa: E402
from softalign.training.optim import make_optimizer  # noqa: E402
from softalign.training.step import build_train_step, create_state, jit_train_step  # noqa: E402


def matmul_peak(dtype: str, size: int, repeats: int = 10) -> float:
    """FLOP/s of a (size x size) @ (size x size) matmul in ``dtype`` with f32 accumulation (best of ``repeats``)."""
    a = jnp.ones((size, size), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def build(args, teacher: str, alpha: float):
    c = schema.base_config()
    c.model = model_preset(args.model)
    c.model.dtype = args.dtype
    if args.image_size:
        c.model.vision.image_size = args.image_size
    if args.patch_size:
        c.model.vision.patch_size = args.patch_size
    c.model.text.vocab_size = c.model.text.vocab_size if c.model.text.vocab_size > 0 else 1024
    c.model.text.eot_id = c.model.text.vocab_size - 1
    c.psd.update(teacher=teacher, alpha_max=alpha, subset_fraction=0.5, ramp="constant")
    mesh = sharding.make_mesh()
    model = build_model(c.model)
    c.batch_size, c.num_steps = args.batch, 1000
    tx, lr = make_optimizer(c.optim, c.num_steps)
    fn, teach, _ = build_train_step(c, model=model, mesh=mesh, tx=tx, lr_schedule=lr)
    size, ctx, vocab = c.model.vision.image_size, c.model.text.context_length, c.model.text.vocab_size
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, vocab - 1, (args.batch, ctx)).astype(np.int32)
    tokens[:, -1] = vocab - 1
    batch = {"image": rng.normal(size=(args.batch, size, size, 3)).astype(np.float32), "tokens": tokens,
             "index": np.arange(args.batch, dtype=np.int32)}
    if teach.host_memory:  # the bank's rows for this batch, as the train loop adds them
        dim = c.model.embed_dim
        batch.update({memory_bank.MEMORY_IMAGE: rng.normal(size=(args.batch, dim)).astype(np.float32),
                      memory_bank.MEMORY_TEXT: rng.normal(size=(args.batch, dim)).astype(np.float32),
                      memory_bank.MEMORY_SEEN: np.ones((args.batch,), bool)})
    params = jax.jit(model.init)(jax.random.key(0), batch["image"][:1], batch["tokens"][:1])["params"]
    state = create_state(params, tx, teach, 0)
    shardings = sharding.state_sharding(mesh, state)
    step = jit_train_step(fn, mesh, shardings)
    state = jax.device_put(state, shardings)
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    t = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) * jax.device_count()  # cost analysis is per device
    return dict(step=compiled, state=state, batch=batch, flops=flops, compile_s=compile_s,
                temp=compiled.memory_analysis().temp_size_in_bytes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B/16")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--image_size", type=int, default=0)
    p.add_argument("--patch_size", type=int, default=0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    p.add_argument("--peak_size", type=int, default=8192)
    args = p.parse_args()
    peak = matmul_peak("bfloat16" if args.dtype == "bfloat16" else "float32", args.peak_size)
    variants = {"CLIP": build(args, "self", 0.0), "PSD(ema)": build(args, "ema", 0.5),
                "PSD(memory)": build(args, "memory", 0.5)}
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, v in variants.items():
            v["state"], m, _ = v["step"](v["state"], v["batch"])  # warm / settle
            jax.block_until_ready(m)
            t = time.perf_counter()
            for _ in range(args.steps):
                v["state"], m, _ = v["step"](v["state"], v["batch"])
            jax.block_until_ready(m)
            times[name].append((time.perf_counter() - t) / args.steps)
    print(f"{jax.devices()[0].device_kind} x{jax.device_count()}, {args.model}, batch {args.batch}, {args.dtype}; "
          f"matmul peak {peak / 1e12:.1f} TFLOP/s ({args.peak_size}^3, f32 accumulation)\n")
    print("| variant | step (ms) | samples/s | TFLOP/step | MFU | ratio to CLIP | compile (s) | temp (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    clip = statistics.median(times["CLIP"])
    for name, v in variants.items():
        t = statistics.median(times[name])
        mfu = v["flops"] / t / peak
        print(f"| {name} | {1e3 * t:.1f} | {args.batch / t:,.1f} | {v['flops'] / 1e12:.3f} | {100 * mfu:.1f}% | "
              f"{t / clip:.3f} | {v['compile_s']:.1f} | {v['temp'] / 2**30:.2f} |")
    print(f"\ncommand: python benchmarks/throughput.py {' '.join(sys.argv[1:])}")


if __name__ == "__main__":
    main()
