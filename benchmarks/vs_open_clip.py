"""softalign vs open_clip: train-step samples/s of the same CLIP architecture on this machine, taken in turns.

    pip install -r requirements-interop.txt        # torch, torchvision, open_clip_torch (benchmark/test extra)
    python benchmarks/vs_open_clip.py                                  # tiny model at 64 and 224 px, batch 64
    python benchmarks/vs_open_clip.py --model=b16 --sizes=224 --batch=8   # ViT-B/16-shaped, slow on a CPU

Each implementation runs in its own worker process (so neither's thread pools or allocator disturb the other);
the driver asks them in turn, round after round, to time ``--steps`` train steps, and reports the median and the
best round of each (ratios from the best by default: on a shared machine a neighbour only ever adds time). Both do the
full step: forward of both towers, the symmetric InfoNCE loss, backward, gradient clipping and AdamW. softalign
runs in its default configuration (model.dtype 'auto': bfloat16 matmul inputs with float32 accumulation where the
device has bf16 instructions, float32 elsewhere; float32 params, LayerNorm and softmax); open_clip runs eager with
torch's default threads in each ``--open_clip_precision``: its float32 default and ``amp_bf16`` (its training
flag, CPU autocast to bfloat16 around the forward pass and the loss). MFU uses the FLOPs of
softalign's compiled step (XLA cost analysis; the same architecture, so the same count for both) against the matmul
peak each worker measures in its own compute dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (vision width, depth, heads, patch), (text width, depth, heads), embed dim, vocab, context
MODELS = {
    "tiny": dict(vision=(192, 4, 3, 16), text=(192, 4, 3), embed=192, vocab=1024, context=32),
    "b16": dict(vision=(768, 12, 12, 16), text=(512, 12, 8), embed=512, vocab=49408, context=77),
}
PRECISIONS = ("fp32", "amp_bf16")  # open_clip's --precision values that run on a CPU
SLOW_PEAK = 0.05  # a worker whose matmul peak is below this share of the fastest one's is timed for one step


def _batch(spec: dict, size: int, batch: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, spec["vocab"] - 1, (batch, spec["context"])).astype(np.int32)
    lengths = rng.integers(4, spec["context"], batch)
    for row, n in enumerate(lengths):  # eot (the largest id) ends each caption, zeros pad the rest
        tokens[row, n - 1] = spec["vocab"] - 1
        tokens[row, n:] = 0
    images = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    return images, tokens


class SoftalignWorker:
    """softalign's jitted CLIP train step (alpha_max = 0), built the way the trainer builds it."""

    def __init__(self, spec: dict, size: int, batch: int, overrides: dict | None = None):
        import jax
        import numpy as np

        from softalign.config import schema
        from softalign.models import build_model
        from softalign.parallel import sharding
        from softalign.training.optim import make_optimizer
        from softalign.training.step import build_train_step, create_state, jit_train_step

        c = schema.base_config()
        vw, vd, vh, patch = spec["vision"]
        tw, td, th = spec["text"]
        c.model.embed_dim = spec["embed"]
        c.model.vision.update(image_size=size, patch_size=patch, width=vw, depth=vd, num_heads=vh)
        c.model.text.update(width=tw, depth=td, num_heads=th, vocab_size=spec["vocab"],
                            context_length=spec["context"], eot_id=spec["vocab"] - 1)
        c.psd.alpha_max, c.psd.teacher = 0.0, "self"  # plain CLIP: no teacher
        c.batch_size, c.num_steps = batch, 1000
        for key, value in (overrides or {}).items():  # dotted config keys, e.g. {"model.dtype": "bfloat16"}
            *parents, leaf = key.split(".")
            node = c
            for name in parents:
                node = node[name]
            node[leaf] = value
        try:
            from softalign.models import precision
        except ImportError:  # an older checkout (--variant NAME=TREE:...): bfloat16 matmuls, no flags
            precision = None
        if precision is not None:  # what `python -m softalign.main` does before JAX starts
            precision.configure_xla_cpu(c.model.dtype)
        mesh = sharding.make_mesh()
        model = build_model(c.model)
        tx, lr = make_optimizer(c.optim, c.num_steps)
        fn, teacher, _ = build_train_step(c, model=model, mesh=mesh, tx=tx, lr_schedule=lr)
        images, tokens = _batch(spec, size, batch)
        batch_arrays = {"image": images, "tokens": tokens, "index": np.arange(batch, dtype=np.int32)}
        params = jax.jit(model.init)(jax.random.key(0), images[:1], tokens[:1])["params"]
        state = create_state(params, tx, teacher, 0)
        shardings = sharding.state_sharding(mesh, state)
        t = time.perf_counter()
        self.step = jit_train_step(fn, mesh, shardings)
        self.state = jax.device_put(state, shardings)
        self.batch = jax.device_put(batch_arrays, sharding.batch_sharding(mesh))
        compiled = self.step.lower(self.state, self.batch).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.flops = float(cost.get("flops", 0.0)) * jax.device_count()
        self.run(1)
        self.warmup_s = time.perf_counter() - t
        self.params = sum(x.size for x in jax.tree.leaves(params))
        # 'auto' -> what this machine runs
        self.dtype = precision.resolve_dtype_name(c.model.dtype) if precision else c.model.dtype

    def run(self, steps: int) -> float:
        import jax

        t = time.perf_counter()
        for _ in range(steps):
            self.state, metrics, _ = self.step(self.state, self.batch)
        jax.block_until_ready(metrics)
        return time.perf_counter() - t

    def peak(self, size: int = 2048) -> float:
        """Matmul FLOP/s in this worker's compute dtype with float32 accumulation (what its model runs)."""
        import jax
        import jax.numpy as jnp

        f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        return _peak(lambda n: jnp.ones((n, n), self.dtype), lambda a: f(a, a).block_until_ready(), size)


class OpenClipWorker:
    """open_clip's CLIP with its ClipLoss, AdamW and gradient clipping: a standard open_clip training step."""

    def __init__(self, spec: dict, size: int, batch: int, precision: str = "fp32"):
        import contextlib

        import open_clip
        import torch
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg

        vw, vd, vh, patch = spec["vision"]
        tw, td, th = spec["text"]
        self.torch = torch
        if precision not in PRECISIONS:
            raise ValueError(f"--open_clip_precision: {precision!r} is not one of {PRECISIONS}")
        # open_clip's --precision amp_bf16: forward and loss under CPU autocast, params and AdamW in float32
        self.autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "amp_bf16" else (
            contextlib.nullcontext)
        self.model = open_clip.model.CLIP(
            spec["embed"],
            vision_cfg=CLIPVisionCfg(layers=vd, width=vw, head_width=vw // vh, patch_size=patch, image_size=size),
            text_cfg=CLIPTextCfg(context_length=spec["context"], vocab_size=spec["vocab"], width=tw, heads=th,
                                 layers=td),
            output_dict=True,
        ).train()
        self.loss = open_clip.loss.ClipLoss()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6,
                                     weight_decay=0.2)
        images, tokens = _batch(spec, size, batch)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        self.tokens = torch.from_numpy(tokens).long()
        t = time.perf_counter()
        self.run(1)
        self.warmup_s = time.perf_counter() - t
        self.params = sum(p.numel() for p in self.model.parameters())
        self.flops = 0.0
        self.dtype = "bfloat16" if precision == "amp_bf16" else "float32"

    def run(self, steps: int) -> float:
        torch = self.torch
        t = time.perf_counter()
        for _ in range(steps):
            self.opt.zero_grad(set_to_none=True)
            with self.autocast():
                out = self.model(self.images, self.tokens)
                loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
        return time.perf_counter() - t

    def peak(self, size: int = 2048) -> float:
        """Matmul FLOP/s in the dtype autocast hands to its linears (bfloat16 under amp_bf16)."""
        torch = self.torch
        return _peak(lambda n: torch.ones(n, n, dtype=getattr(torch, self.dtype)), lambda a: a @ a, size)


def _peak(make, matmul, size: int) -> float:
    """Best-of FLOP/s of an n^3 matmul, n = ``size``; a kernel so slow that one 512^3 product takes over 0.1 s (a
    bf16 fallback on a CPU without bf16 instructions) is measured at 512 so that the benchmark still ends."""
    small = make(512)
    matmul(small)
    n = size if _timed(lambda: matmul(small)) < 0.1 else 512
    a = make(n)
    matmul(a)
    return 2 * n**3 / min(_timed(lambda: matmul(a)) for _ in range(10 if n == size else 3))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def worker_main(impl: str, model: str, size: int, batch: int, overrides: dict, precision: str) -> None:
    """Serve timing requests on stdin/stdout: one integer (steps) in, one JSON line out."""
    if impl == "softalign":
        w = SoftalignWorker(MODELS[model], size, batch, overrides)
    else:
        w = OpenClipWorker(MODELS[model], size, batch, precision)
    if impl == "softalign":
        import softalign

        print(f"softalign worker: {os.path.dirname(softalign.__file__)}", file=sys.stderr)
    print(json.dumps(dict(ready=True, warmup_s=w.warmup_s, flops=w.flops, params=w.params, peak=w.peak(),
                          dtype=str(w.dtype))), flush=True)
    for line in sys.stdin:
        print(json.dumps(dict(seconds=w.run(int(line)))), flush=True)


class Worker:
    """The driver's handle on one worker process; ``tree`` is the source checkout whose softalign it imports."""

    def __init__(self, impl: str, model: str, size: int, batch: int, tree: str = ROOT, precision: str = "fp32",
                 overrides: dict | None = None):
        cmd = [sys.executable, os.path.abspath(__file__), f"--worker={impl}", f"--tree={tree}", f"--model={model}",
               f"--sizes={size}", f"--batch={batch}", f"--open_clip_precision={precision}",
               f"--overrides={json.dumps(overrides or {})}"]
        env = dict(os.environ)
        overrides = dict(overrides or {})
        for key in [k for k in overrides if k.isupper()]:  # not config keys: this worker's environment variables
            value = overrides.pop(key)  # (A/B a compiler flag: XLA_FLAGS is appended to, others are set)
            env[key] = " ".join(filter(None, [env.get(key, ""), value])) if key == "XLA_FLAGS" else value
        cmd[-1] = f"--overrides={json.dumps(overrides)}"
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     env=env)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.proc.args} died (exit {self.proc.wait()})")
        return json.loads(line)

    def time(self, steps: int) -> float:
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        return self._read()["seconds"] / steps

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def compare(model: str, size: int, batch: int, rounds: int, steps: int, variants: dict[str, tuple[str, dict]],
            precisions: list[str]) -> dict:
    """Start one worker per softalign variant (a source tree and config overrides) and per open_clip precision,
    time them in turns (the order rotates every round, so a noisy neighbour slows all alike), and return medians
    and derived numbers."""
    workers = {name: Worker("softalign", model, size, batch, tree, overrides=overrides)
               for name, (tree, overrides) in variants.items()}
    workers.update({f"open_clip {p}": Worker("open_clip", model, size, batch, precision=p) for p in precisions})
    names = list(workers)
    times = {name: [] for name in names}
    best = max(w.info["peak"] for w in workers.values())
    slow = {n for n, w in workers.items() if w.info["peak"] < SLOW_PEAK * best}  # e.g. bf16 without bf16 hardware
    for name in slow:
        print(f"{name}: matmul peak {workers[name].info['peak'] / 1e9:.1f} GFLOP/s, under {SLOW_PEAK:.0%} of the "
              "fastest worker's: timed for one step only", file=sys.stderr, flush=True)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name not in slow or not times[name]:
                times[name].append(workers[name].time(1 if name in slow else steps))
    for w in workers.values():
        w.close()
    flops = next(w.info["flops"] for name, w in workers.items() if name.startswith("softalign"))
    out = dict(model=model, size=size, batch=batch, flops=flops, rows={})
    for name, w in workers.items():
        t = statistics.median(times[name])
        out["rows"][name] = dict(step_s=t, best_s=min(times[name]), peak=w.info["peak"],  # samples/s, MFU: derived
                                 dtype=w.info["dtype"], warmup_s=w.info["warmup_s"], params=w.info["params"],
                                 spread=(min(times[name]) / t, max(times[name]) / t))
    return out


def cpu_model() -> str:
    """The CPU's model name (lscpu / /proc/cpuinfo), so a table says which bf16 kernels it measured."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The bf16-relevant ISA flags this CPU reports (AMX, AVX512-BF16, AVX-VNNI-BF16...)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split(":", 1)[1].split()
    except (OSError, StopIteration):
        return "?"
    keep = [f for f in flags if "bf16" in f or f.startswith("amx") or f in ("avx512f", "avx2")]
    return ",".join(sorted(keep)) or "none"


def print_table(results: list[dict], args: argparse.Namespace) -> None:
    import torch

    print(f"\nCPU: {cpu_model()} ({os.cpu_count()} cores; {cpu_flags()}); jax {_jax_version()}, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads); model {args.model}, batch {args.batch}, "
          f"{args.rounds} rounds x {args.steps} steps; ratios from the {args.stat} step of each worker\n")
    opens = [f"open_clip {p}" for p in args.open_clip_precision.split(",")]
    key = "best_s" if args.stat == "min" else "step_s"
    print("| image | impl | params | matmul inputs | median step (ms) | best step (ms) | samples/s | GFLOP/step | "
          "peak (GFLOP/s) | MFU | warm-up (s) | " + " | ".join(f"vs {o}" for o in opens) + " |")
    print("|---" * (11 + len(opens)) + "|")
    for r in results:
        for name, x in r["rows"].items():
            ratios = " | ".join(f"**{r['rows'][o][key] / x[key]:.2f}x**" for o in opens)
            print(f"| {r['size']} px | {name} | {x['params'] / 1e6:.2f}M | {x['dtype']} | {1e3 * x['step_s']:.1f} | "
                  f"{1e3 * x['best_s']:.1f} | {r['batch'] / x[key]:.1f} | {r['flops'] / 1e9:.1f} | "
                  f"{x['peak'] / 1e9:.0f} | {100 * r['flops'] / x[key] / x['peak']:.1f}% | {x['warmup_s']:.1f} | "
                  f"{ratios} |")
    print("\nMFU: the FLOPs of softalign's compiled step (XLA cost analysis; the same architecture, so the same "
          "count for all) over the matmul peak each worker measured (2048^3, float32 accumulation) in the dtype its "
          "matmuls actually run: bfloat16 for softalign's default and open_clip amp_bf16, float32 for open_clip fp32.")
    print(f"command: python benchmarks/vs_open_clip.py {' '.join(sys.argv[1:])}")


def _jax_version() -> str:
    try:
        from importlib.metadata import version

        return version("jax")
    except Exception:  # noqa: BLE001 - only a label
        return "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", choices=sorted(MODELS))
    p.add_argument("--sizes", default="64,224", help="comma-separated image sizes")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=5, help="steps per implementation per round")
    p.add_argument("--open_clip_precision", default="fp32,amp_bf16",
                   help=f"comma-separated open_clip precisions, each its own worker ({', '.join(PRECISIONS)})")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=[TREE:]JSON",
                   help='an extra softalign worker: config overrides as JSON, optionally from another checkout '
                   '(A/B a change), e.g. f32={"model.dtype":"float32"} or before=/tmp/base:{}; upper-case keys '
                   '(XLA_FLAGS, SOFTALIGN_XLA_DEFAULTS) set that worker\'s environment; repeatable')
    p.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--stat", default="min", choices=("min", "median"),
                   help="which step time the ratios, samples/s and MFU use: the best of the rounds (robust to a noisy "
                        "neighbour, which only ever adds time) or their median")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--tree", default=ROOT, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        sys.path.insert(0, args.tree)  # this worker's softalign comes from its tree
        return worker_main(args.worker, args.model, int(args.sizes), args.batch, json.loads(args.overrides),
                           args.open_clip_precision)
    precisions = args.open_clip_precision.split(",")
    for prec in precisions:
        if prec not in PRECISIONS:
            p.error(f"--open_clip_precision: {prec!r} is not one of {PRECISIONS}")
    variants = {"softalign": (ROOT, {})}
    for item in args.variant:
        name, _, spec = item.partition("=")
        tree, _, overrides = spec.partition(":") if not spec.startswith("{") else ("", "", spec)
        variants[f"softalign:{name}"] = (os.path.abspath(tree) if tree else ROOT, json.loads(overrides or "{}"))
    results = [compare(args.model, int(s), args.batch, args.rounds, args.steps, variants, precisions)
               for s in args.sizes.split(",")]
    print_table(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
