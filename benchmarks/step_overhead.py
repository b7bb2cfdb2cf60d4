"""Step-time overhead of PSD over plain CLIP, measured interleaved in one process.

For each model it builds and compiles four jitted functions on the same mesh and the same random batch:

* ``CLIP``       psd.alpha_max = 0: InfoNCE only, no teacher forward (teacher 'self', so no teacher state either);
* ``PSD(self)``  teacher 'self', alpha_max 0.5, temperature 0.5, subset_fraction 0.5;
* ``PSD(ema)``   teacher 'ema',  alpha_max 0.5, subset_fraction rho (``--rho``);
* ``PSD(memory)`` teacher 'memory' (no extra forward), alpha_max 0.5, subset_fraction rho: each call also does
  what the train loop does around the step, the host bank's lookup for the batch and the write-back of the
  previous step's embeddings (``MemoryBank.lookup`` / ``stage``), with every row already seen (the steady state);
* ``forward``    the model's forward pass on the full batch (``model.apply`` -> embeddings), no gradients;

then runs rounds in which each of them runs ``--steps-per-round`` calls in turn (the order rotates every round),
every call ending in ``jax.block_until_ready``. Shared, noisy machines slow all four alike within a round, so each
ratio is taken within a round and the table reports the median over rounds.

Targets printed beside the results:

* PSD(self)/CLIP <= 1.02 and PSD(memory)/CLIP <= 1.02 (no extra forward: the self teacher reuses the student's
  logits, the memory teacher the embeddings stored at each record's last visit);
* PSD(ema)/CLIP  <= 1 + rho * forward_share + 0.02, where forward_share = forward time / CLIP step time
  (the EMA teacher embeds only the subset S of about rho * B rows).

Run from the repository root::

    python benchmarks/step_overhead.py                      # demo and ViT-B/16 (batch 8), ~7 min on 2 CPU cores
    python benchmarks/step_overhead.py --models demo        # the demo model only, about a minute
    python benchmarks/step_overhead.py --models vitb16 --vitb16-depth 2   # quick run on a shallower B/16
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Any, Callable

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

MODELS = ("demo", "vitb16")
# Per-model defaults for --rounds / --steps-per-round (the B/16 step takes seconds on 2 CPU cores).
DEFAULT_ROUNDS = {"demo": 10, "vitb16": 5}
DEFAULT_STEPS = {"demo": 3, "vitb16": 2}
SELF_TARGET = 1.02
SLACK = 0.02

CLIP, SELF, EMA, MEMORY, FORWARD = "CLIP", "PSD(self)", "PSD(ema)", "PSD(memory)", "forward"
DEFAULT_TEACHER = schema.base_config().psd.teacher


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,vitb16", help="comma-separated subset of: " + ",".join(MODELS))
    p.add_argument("--rounds", type=int, default=None,
                   help=f"interleaved rounds per model (default: {DEFAULT_ROUNDS})")
    p.add_argument("--steps-per-round", type=int, default=None,
                   help=f"calls of each variant per round (default: {DEFAULT_STEPS})")
    p.add_argument("--rho", type=float, default=0.5, help="psd.subset_fraction of the PSD(ema) variant")
    p.add_argument("--batch-demo", type=int, default=128, help="global batch of the demo model")
    p.add_argument("--batch-vitb16", type=int, default=8, help="global batch of the ViT-B/16 model")
    p.add_argument("--vitb16-depth", type=int, default=12,
                   help="depth of both B/16 towers; 12 is the real ViT-B/16, smaller only for a quick run")
    p.add_argument("--devices", type=int, default=1, help="data-parallel devices in the mesh")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown or not args.models:
        p.error(f"--models: unknown {unknown}; choose from {MODELS}")
    if not 0.0 < args.rho <= 1.0:
        p.error("--rho must be in (0, 1]")
    for name in ("rounds", "steps_per_round"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


# ----------------------------------------------------------------------------------------------------------- setup


def model_config(name: str, args: argparse.Namespace) -> tuple[Any, int, str]:
    """Returns (experiment config, batch size, label) for one benchmarked model."""
    if name == "demo":
        c = schema.demo_config()  # 32 px, patch 4, width 128, depth 3, context 40
        c.model.text.vocab_size, c.model.text.eot_id = 1024, 2
        batch, label = args.batch_demo, "demo"
    else:
        c = schema.base_config()
        c.model = model_preset("ViT-B/16")  # 224 px, patch 16, 768x12 vision, 512x12 text, context 77
        c.model.text.vocab_size, c.model.text.eot_id = 49408, 49407
        if args.vitb16_depth != 12:
            c.model.vision.depth = c.model.text.depth = args.vitb16_depth
        c.data.image_size = c.model.vision.image_size
        batch = args.batch_vitb16
        label = "ViT-B/16" if args.vitb16_depth == 12 else f"ViT-B/16 (depth {args.vitb16_depth})"
    c.batch_size = batch
    c.seed = args.seed
    return c, batch, label


def variant_psd(base: Any, variant: str, rho: float) -> Any:
    psd = base.psd.copy_and_resolve_references()
    psd.ramp = "constant"  # alpha = alpha_max from step 0 (cost does not depend on alpha's value)
    psd.subset_groups = 0
    if variant == CLIP:
        psd.update(teacher="self", alpha_max=0.0)
    elif variant == SELF:
        psd.update(teacher="self", alpha_max=0.5, temperature=0.5, subset_fraction=0.5)
    elif variant == EMA:
        psd.update(teacher="ema", alpha_max=0.5, subset_fraction=rho)
    elif variant == MEMORY:
        psd.update(teacher="memory", alpha_max=0.5, subset_fraction=rho)
    else:
        raise ValueError(variant)
    return psd


def random_batch(rng: np.random.Generator, batch: int, image_size: int, context: int, vocab: int,
                 eot: int) -> dict[str, np.ndarray]:
    """Normalised-looking images and valid token rows: sot, words, eot, then pad 0."""
    sot = 1 if eot != 1 else 3
    tokens = np.zeros((batch, context), np.int32)
    for i in range(batch):
        n = int(rng.integers(3, context - 1))  # words per caption; sot + n + eot <= context
        words = rng.integers(3, vocab, n)
        words[(words == eot) | (words == sot)] = 4  # ids 0..2 are pad / sot / eot in the demo vocabulary
        tokens[i, 0] = sot
        tokens[i, 1:1 + n] = words
        tokens[i, 1 + n] = eot
    images = rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
    return {"image": images, "tokens": tokens}


@dataclasses.dataclass
class Variant:
    name: str
    call: Callable[[], None]  # runs one step (or forward) and blocks until it is done
    compile_s: float
    temp_bytes: int
    times: list[list[float]] = dataclasses.field(default_factory=list)  # per round, per call (seconds)

    def round_means(self) -> list[float]:
        return [sum(r) / len(r) for r in self.times]


def build_variants(c: Any, batch: int, args: argparse.Namespace) -> dict[str, Variant]:
    mesh = sharding.make_mesh(args.devices)
    model = build_model(c.model)
    tx, lr_schedule = make_optimizer(c.optim, c.num_steps)
    size, ctx = c.model.vision.image_size, c.model.text.context_length
    rng = np.random.default_rng(args.seed)
    batch_s = sharding.batch_sharding(mesh)
    host_batch = random_batch(rng, batch, size, ctx, c.model.text.vocab_size, c.model.text.eot_id)
    dev_batch = jax.device_put(host_batch, batch_s)
    init_images = jnp.zeros((1, size, size, 3), jnp.float32)
    init_tokens = jnp.zeros((1, ctx), jnp.int32)

    variants: dict[str, Variant] = {}
    holders: dict[str, dict[str, Any]] = {}  # the live (donated and re-threaded) state of each step variant
    for name in (CLIP, SELF, EMA, MEMORY):
        cv = c.copy_and_resolve_references()
        cv.psd = variant_psd(c, name, args.rho)
        step_fn, teacher, _ = build_train_step(cv, model=model, mesh=mesh, tx=tx, lr_schedule=lr_schedule)
        bank = None
        if teacher.host_memory:  # a bank of `batch` records, all seen, as after the first epoch
            bank = memory_bank.MemoryBank(batch, c.model.embed_dim, cv.psd.memory_dtype)
            bank.write(np.arange(batch), rng.normal(size=(batch, c.model.embed_dim)),
                       rng.normal(size=(batch, c.model.embed_dim)), 0)
        index = np.arange(batch, dtype=np.int32)
        step_batch = dev_batch if bank is None else jax.device_put(
            {**host_batch, "index": index, **bank.lookup(index)}, batch_s)

        def init_state(teacher=teacher):
            params = model.init(jax.random.key(c.seed), init_images, init_tokens)["params"]
            return create_state(params, tx, teacher, c.seed)

        shardings = sharding.state_sharding(mesh, jax.eval_shape(init_state))
        state = jax.jit(init_state, out_shardings=shardings)()
        jitted = jit_train_step(step_fn, mesh, shardings)
        t0 = time.perf_counter()
        compiled = jitted.lower(state, step_batch).compile()
        compile_s = time.perf_counter() - t0
        holder = {"state": state}
        holders[name] = holder

        def call(compiled=compiled, holder=holder, bank=bank, step_batch=step_batch):
            if bank is not None:  # the loop's host work: look the rows up, put them on the device
                step_batch = jax.device_put({**host_batch, "index": index, **bank.lookup(index)}, batch_s)
            new_state, metrics, host = compiled(holder["state"], step_batch)  # the old state is donated
            holder["state"] = new_state
            if bank is not None:  # write back the previous call's embeddings, keep this one's pending
                bank.stage(host, int(holder.setdefault("step", 1)) + 1)
                holder["step"] += 1
            jax.block_until_ready((new_state, metrics))

        variants[name] = Variant(name, call, compile_s, _temp_bytes(compiled))

    # Forward only, full batch, no gradients: the cost a teacher forward on all B rows would add.
    rep = sharding.replicated(mesh)
    fwd = jax.jit(lambda p, images, tokens: model.apply({"params": p}, images, tokens),
                  in_shardings=(rep, batch_s, batch_s), out_shardings=rep)
    clip = holders[CLIP]
    t0 = time.perf_counter()
    fwd_compiled = fwd.lower(clip["state"].params, dev_batch["image"], dev_batch["tokens"]).compile()
    fwd_compile_s = time.perf_counter() - t0

    def fwd_call():  # reads the CLIP state's current params (never a donated buffer)
        jax.block_until_ready(fwd_compiled(clip["state"].params, dev_batch["image"], dev_batch["tokens"]))

    variants[FORWARD] = Variant(FORWARD, fwd_call, fwd_compile_s, _temp_bytes(fwd_compiled))
    return variants


def _temp_bytes(compiled: Any) -> int:
    stats = compiled.memory_analysis()
    return -1 if stats is None else int(stats.temp_size_in_bytes)


# ----------------------------------------------------------------------------------------------------------- timing


def run_rounds(variants: dict[str, Variant], rounds: int, steps: int, label: str) -> None:
    order = list(variants)
    for name in order:  # warm-up, untimed: first executions allocate buffers and thread pools
        variants[name].call()
    for r in range(rounds):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            v = variants[name]
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                v.call()
                times.append(time.perf_counter() - t0)
            v.times.append(times)
        means = {n: variants[n].round_means()[-1] for n in order}
        print(f"  [{label}] round {r + 1}/{rounds}: "
              + ", ".join(f"{n} {1e3 * t:.1f} ms" for n, t in means.items()), file=sys.stderr, flush=True)


@dataclasses.dataclass
class Result:
    label: str
    batch: int
    rho: float
    rounds: int
    steps: int
    variants: dict[str, Variant]

    def median_time(self, name: str) -> float:
        return statistics.median(self.variants[name].round_means())

    def median_ratio(self, name: str) -> float:
        """Median over rounds of (variant / CLIP) within the same round."""
        num, den = self.variants[name].round_means(), self.variants[CLIP].round_means()
        return statistics.median(a / b for a, b in zip(num, den))

    def spread(self, name: str) -> tuple[float, float]:
        num, den = self.variants[name].round_means(), self.variants[CLIP].round_means()
        ratios = [a / b for a, b in zip(num, den)]
        return min(ratios), max(ratios)


def markdown(results: list[Result]) -> str:
    head = ("| model | batch | variant | step (ms) | samples/s | ratio to CLIP (min-max) | target | met "
            "| compile (s) | temp (MiB) |")
    rows = [head, "|" + "---|" * 10]
    for res in results:
        share = res.median_ratio(FORWARD)
        ema_target = 1.0 + res.rho * share + SLACK
        for name in (CLIP, SELF, EMA, MEMORY, FORWARD):
            v = res.variants[name]
            t = res.median_time(name)
            ratio = res.median_ratio(name)
            lo, hi = res.spread(name)
            ratio_s = "1" if name == CLIP else f"{ratio:.4f} ({lo:.3f}-{hi:.3f})"
            if name in (SELF, MEMORY):
                target, met = f"<= {SELF_TARGET:.2f}", "yes" if ratio <= SELF_TARGET else "no"
            elif name == EMA:
                target = f"<= 1 + {res.rho:g} x {share:.4f} + {SLACK:.2f} = {ema_target:.4f}"
                met = "yes" if ratio <= ema_target else "no"
            elif name == FORWARD:
                target, met = "(= forward share)", ""
            else:
                target, met = "", ""
            label = {EMA: f"PSD(ema, rho={res.rho:g})", MEMORY: f"PSD(memory, rho={res.rho:g})",
                     FORWARD: "forward only"}.get(name, name)
            if name == f"PSD({DEFAULT_TEACHER})":
                label += " (default)"
            temp = "n/a" if v.temp_bytes < 0 else f"{v.temp_bytes / 2**20:.1f}"
            rows.append(f"| {res.label} | {res.batch} | {label} | {1e3 * t:.1f} | {res.batch / t:.1f} | {ratio_s} "
                        f"| {target} | {met} | {v.compile_s:.1f} | {temp} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print(f"# step overhead: jax {jax.__version__}, backend {jax.default_backend()}, "
          f"{args.devices} of {jax.device_count()} device(s), {os.cpu_count()} CPU(s), {platform.machine()}",
          file=sys.stderr, flush=True)
    results = []
    for name in args.models:
        c, batch, label = model_config(name, args)
        rounds = args.rounds or DEFAULT_ROUNDS[name]
        steps = args.steps_per_round or DEFAULT_STEPS[name]
        print(f"[{label}] batch {batch}: building and compiling 4 steps + forward ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        variants = build_variants(c, batch, args)
        print(f"[{label}] built in {time.perf_counter() - t0:.1f} s; {rounds} rounds x {steps} calls each",
              file=sys.stderr, flush=True)
        run_rounds(variants, rounds, steps, label)
        results.append(Result(label, batch, args.rho, rounds, steps, variants))
        del variants
    total = time.perf_counter() - start

    print()
    print(markdown(results))
    print()
    for res in results:
        print(f"- {res.label}: {res.rounds} interleaved rounds x {res.steps} calls per variant; step time and ratios "
              f"are medians over rounds (ratios taken within each round). forward share = forward-only time on the "
              f"full batch / CLIP step time = {res.median_ratio(FORWARD):.4f}.")
    print(f"- jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPU cores), "
          f"{args.devices}-device mesh; temp = compiled temp_size_in_bytes; total runtime {total:.0f} s.")
    print()
    print(f"Command: `{command}`")


if __name__ == "__main__":
    main()
