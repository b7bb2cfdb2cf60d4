"""softalign vs open_clip: train-step samples/s of the same CLIP architecture on this machine, taken in turns.

    pip install -r requirements-interop.txt        # torch, torchvision, open_clip_torch (benchmark/test extra)
    python benchmarks/vs_open_clip.py                                  # tiny model at 64 and 224 px, batch 64
    python benchmarks/vs_open_clip.py --model=b16 --sizes=224 --batch=8   # ViT-B/16-shaped, slow on a CPU

Each implementation runs in its own worker process (so neither's thread pools or allocator disturb the other);
the driver asks them in turn, round after round, to time ``--steps`` train steps, and reports medians. Both do the
full step: forward of both towers, the symmetric InfoNCE loss, backward, gradient clipping and AdamW. softalign
runs in its default configuration (bfloat16 matmul inputs with float32 accumulation, float32 params, LayerNorm and
softmax); open_clip runs in its default float32 eager mode with torch's default threads. MFU uses the FLOPs of
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
        from softalign.objectives.teachers import make_teacher
        from softalign.parallel import sharding
        from softalign.training.optim import make_optimizer
        from softalign.training.step import create_state, jit_train_step, make_train_step

        c = schema.base_config()
        vw, vd, vh, patch = spec["vision"]
        tw, td, th = spec["text"]
        c.model.embed_dim = spec["embed"]
        c.model.vision.update(image_size=size, patch_size=patch, width=vw, depth=vd, num_heads=vh)
        c.model.text.update(width=tw, depth=td, num_heads=th, vocab_size=spec["vocab"],
                            context_length=spec["context"], eot_id=spec["vocab"] - 1)
        c.psd.alpha_max = 0.0
        for key, value in (overrides or {}).items():  # dotted config keys, e.g. {"model.dtype": "bfloat16"}
            *parents, leaf = key.split(".")
            node = c
            for name in parents:
                node = node[name]
            node[leaf] = value
        mesh = sharding.make_mesh()
        model = build_model(c.model)
        tx, lr = make_optimizer(c.optim, 1000)
        teacher = make_teacher(c.psd)
        images, tokens = _batch(spec, size, batch)
        batch_arrays = {"image": images, "tokens": tokens, "index": np.arange(batch, dtype=np.int32)}
        params = jax.jit(model.init)(jax.random.key(0), images[:1], tokens[:1])["params"]
        state = create_state(params, tx, teacher, 0)
        shardings = sharding.state_sharding(mesh, state)
        fn = make_train_step(model=model, tx=tx, lr_schedule=lr, teacher=teacher, psd_config=c.psd,
                             num_steps=1000, mesh=mesh, batch_size=batch)
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
        self.dtype = c.model.dtype

    def run(self, steps: int) -> float:
        import jax

        t = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready(metrics)
        return time.perf_counter() - t

    def peak(self, size: int = 2048) -> float:
        """Matmul FLOP/s in this worker's compute dtype with float32 accumulation (what its model runs)."""
        import jax
        import jax.numpy as jnp

        a = jnp.ones((size, size), self.dtype)
        f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        f(a, a).block_until_ready()
        return 2 * size**3 / min(_timed(lambda: f(a, a).block_until_ready()) for _ in range(10))


class OpenClipWorker:
    """open_clip's CLIP with its ClipLoss, AdamW and gradient clipping: a standard open_clip training step."""

    def __init__(self, spec: dict, size: int, batch: int):
        import open_clip
        import torch
        from open_clip.model import CLIPTextCfg, CLIPVisionCfg

        vw, vd, vh, patch = spec["vision"]
        tw, td, th = spec["text"]
        self.torch = torch
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
        self.dtype = "float32"

    def run(self, steps: int) -> float:
        torch = self.torch
        t = time.perf_counter()
        for _ in range(steps):
            self.opt.zero_grad(set_to_none=True)
            out = self.model(self.images, self.tokens)
            loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
        return time.perf_counter() - t

    def peak(self, size: int = 2048) -> float:
        torch = self.torch
        a = torch.ones(size, size)
        a @ a
        return 2 * size**3 / min(_timed(lambda: a @ a) for _ in range(10))


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def worker_main(impl: str, model: str, size: int, batch: int, overrides: dict) -> None:
    """Serve timing requests on stdin/stdout: one integer (steps) in, one JSON line out."""
    if impl == "softalign":
        w = SoftalignWorker(MODELS[model], size, batch, overrides)
    else:
        w = OpenClipWorker(MODELS[model], size, batch)
    print(json.dumps(dict(ready=True, warmup_s=w.warmup_s, flops=w.flops, params=w.params, peak=w.peak(),
                          dtype=w.dtype)), flush=True)
    for line in sys.stdin:
        print(json.dumps(dict(seconds=w.run(int(line)))), flush=True)


class Worker:
    """The driver's handle on one worker process."""

    def __init__(self, impl: str, model: str, size: int, batch: int, env: dict | None = None,
                 overrides: dict | None = None):
        cmd = [sys.executable, os.path.abspath(__file__), f"--worker={impl}", f"--model={model}",
               f"--sizes={size}", f"--batch={batch}", f"--overrides={json.dumps(overrides or {})}"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     env=dict(os.environ, **(env or {})))
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


def compare(model: str, size: int, batch: int, rounds: int, steps: int) -> dict:
    """Start both workers, time them in turns, and return medians and derived numbers."""
    workers = {impl: Worker(impl, model, size, batch) for impl in ("softalign", "open_clip")}
    times = {impl: [] for impl in workers}
    for r in range(rounds):
        order = list(workers) if r % 2 == 0 else list(reversed(workers))
        for impl in order:
            times[impl].append(workers[impl].time(steps))
    for w in workers.values():
        w.close()
    flops = workers["softalign"].info["flops"]
    out = dict(model=model, size=size, batch=batch, flops=flops)
    for impl, w in workers.items():
        t = statistics.median(times[impl])
        out[impl] = dict(step_s=t, samples_s=batch / t, mfu=flops / t / w.info["peak"], peak=w.info["peak"],
                         dtype=w.info["dtype"], warmup_s=w.info["warmup_s"],
                         params=w.info["params"], spread=(min(times[impl]) / t, max(times[impl]) / t))
    out["ratio"] = out["softalign"]["samples_s"] / out["open_clip"]["samples_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", choices=sorted(MODELS))
    p.add_argument("--sizes", default="64,224", help="comma-separated image sizes")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=5, help="steps per implementation per round")
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker_main(args.worker, args.model, int(args.sizes), args.batch, json.loads(args.overrides))

    results = [compare(args.model, int(s), args.batch, args.rounds, args.steps) for s in args.sizes.split(",")]
    import torch

    print(f"\n{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"model {args.model}, batch {args.batch}, {args.rounds} rounds x {args.steps} steps, medians\n")
    print("| image | impl | params | matmul inputs | step (ms) | samples/s | GFLOP/step | MFU | warm-up (s) | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for impl in ("softalign", "open_clip"):
            x = r[impl]
            ratio = f"**{r['ratio']:.2f}x**" if impl == "softalign" else "1.00x"
            print(f"| {r['size']} px | {impl} | {x['params'] / 1e6:.2f}M | {x['dtype']} | {1e3 * x['step_s']:.1f} | "
                  f"{x['samples_s']:.1f} | {r['flops'] / 1e9:.1f} | {100 * x['mfu']:.1f}% | {x['warmup_s']:.1f} | "
                  f"{ratio} |")
    peaks = {impl: max(r[impl]["peak"] for r in results) / 1e9 for impl in ("softalign", "open_clip")}
    print(f"\nMFU: the FLOPs of softalign's compiled step (XLA cost analysis) over the matmul peak each worker "
          f"measured in its own compute dtype, float32 accumulation: softalign (JAX) {peaks['softalign']:.0f} GFLOP/s, "
          f"open_clip (torch) {peaks['open_clip']:.0f} GFLOP/s.")
    print(f"command: python benchmarks/vs_open_clip.py {' '.join(sys.argv[1:])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
