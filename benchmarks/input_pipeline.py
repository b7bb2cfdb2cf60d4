"""Input-pipeline throughput: 224 px training preprocessing from ArrayRecord JPEGs, against what a train step eats.

1. Generates ``--num_images`` photo-like JPEGs (``--width`` x ``--height``, quality 90, ~28 kB each) with five
   captions each into a temporary folder (Flickr layout) and converts them with ``softalign.data.convert``.
2. Times ``pipeline.make_train_iterator`` (read -> validate + draft-mode decode -> random resized crop -> normalise ->
   batch + tokenize) in-process with Grain read threads, and with Grain worker processes (``mp_prefetch``),
   after a warm-up; reports images/s per host.
3. Compares with the images/s a train step consumes: ``--step_ms 'ViT-B/16=410,ViT-S/16=150' --step_batch 256``
   (per-chip step time and per-chip batch, e.g. measured on the accelerator with benchmarks/step_overhead.py);
   without ``--step_ms`` it measures one step of each model here, on the local JAX backend, at ``--step_batch``.
4. Profiles the map functions (cProfile and per-stage timers over ``--profile_records`` records) and names the
   slowest stage.

Prints a markdown table and the command that produced it. Run from the repository root::

    python benchmarks/input_pipeline.py                                  # ~3 min on 2 CPU cores
    python benchmarks/input_pipeline.py --step_ms 'ViT-B/16=400,ViT-S/16=140' --step_batch 256 --workers 0,4,8
"""

from __future__ import annotations

import argparse
import concurrent.futures
import cProfile
import os
import platform
import pstats
import shlex
import shutil
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data_fixtures  # noqa: E402
import numpy as np  # noqa: E402

from softalign.data import convert, decode, pipeline, sources
from softalign.data.tokenizer import corpus_tokenizer  # noqa: E402

WORDS = ("a man woman dog child cat bicycle red blue green small large runs sits stands jumps near on beside under "
         "the grass water street beach field snow park wall road").split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num_images", type=int, default=2000)
    p.add_argument("--width", type=int, default=400)
    p.add_argument("--height", type=int, default=300)
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128, help="per-process batch of the timed pipeline")
    p.add_argument("--threads", default="2", help="comma-separated Grain read-thread counts to time in-process")
    p.add_argument("--workers", default="2", help="comma-separated Grain worker-process counts (0 = skip)")
    p.add_argument("--seconds", type=float, default=8.0, help="timing window per configuration")
    p.add_argument("--step_ms", default="", help="per-chip step times, e.g. 'ViT-B/16=410,ViT-S/16=150'")
    p.add_argument("--step_batch", type=int, default=0,
                   help="per-chip batch of those steps (default: 256 with --step_ms, 8 when measured here)")
    p.add_argument("--models", default="ViT-B/16,ViT-S/16", help="models to measure when --step_ms is not given")
    p.add_argument("--profile_records", type=int, default=300)
    p.add_argument("--keep", default="", help="keep the generated data in this folder (reused when present)")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------------- data


def _one_image(args_seed: tuple[int, int, int]) -> bytes:
    width, height, seed = args_seed
    return data_fixtures.jpeg(np.random.default_rng(seed), width, height, quality=90)


def make_dataset(root: str, n: int, width: int, height: int) -> tuple[str, dict[str, float]]:
    """Writes n JPEGs + captions (Flickr layout) and converts them; returns (ArrayRecord dir, stats)."""
    folder, out = os.path.join(root, "folder"), os.path.join(root, "arrayrecord")
    stats: dict[str, float] = {}
    if not os.path.exists(os.path.join(out, "dataset_info.json")):
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 2) as pool:
            images = list(pool.map(_one_image, [(width, height, i) for i in range(n)]))
        stats["generate_s"] = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        items = [(f"{i:06d}.jpg", data, [" ".join(rng.choice(WORDS, int(rng.integers(6, 14)))) for _ in range(5)])
                 for i, data in enumerate(images)]
        data_fixtures.write_folder(folder, items)
        stats["jpeg_kb"] = float(np.mean([len(d) for d in images]) / 1024)
        t0 = time.perf_counter()
        convert.main(["--source=folder", f"--input={folder}", f"--output_dir={out}", "--quiet", "--overwrite"])
        stats["convert_rec_s"] = n / (time.perf_counter() - t0)
    return out, stats


# ------------------------------------------------------------------------------------------------------- timing


def time_pipeline(cfg: Any, tok: Any, batch: int, seconds: float) -> tuple[float, float]:
    """(images/s after warm-up, seconds to the first batch)."""
    t0 = time.perf_counter()
    it = pipeline.make_train_iterator(cfg, tok, global_batch_size=batch, seed=0)
    next(it)
    first = time.perf_counter() - t0
    for _ in range(2):
        next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += len(next(it)["index"])
    rate = n / (time.perf_counter() - t0)
    if hasattr(it, "close"):
        it.close()
    return rate, first


def profile_stages(cfg: Any, tok: Any, n: int) -> tuple[dict[str, float], str]:
    """Per-image milliseconds of each map-stage function, and cProfile's top functions by own time."""
    source = sources.build_source(cfg, "train")
    augment = pipeline.DecodeAndAugment(int(cfg.image_size), cfg.crop_scale, cfg.crop_ratio)
    rng = np.random.default_rng(0)
    times = {"read (ArrayRecord + msgpack)": 0.0, "validate + decode (draft)": 0.0,
             "random resized crop": 0.0, "normalise (per image)": 0.0, "stack (batch)": 0.0,
             "tokenize (batched)": 0.0}
    profiler = cProfile.Profile()
    profiler.enable()
    crops, captions = [], []
    for i in range(n):
        t0 = time.perf_counter()
        raw = source[i % len(source)]
        t1 = time.perf_counter()
        element = decode.prepare(raw, min_size=augment.min_size, pixel_limit=augment.pixel_limit)
        t2 = time.perf_counter()
        element = augment.crop.random_map(element, rng)
        t3 = time.perf_counter()
        image = pipeline.normalize_images(element["image"], cfg.mean, cfg.std)
        t4 = time.perf_counter()
        times["read (ArrayRecord + msgpack)"] += t1 - t0
        times["validate + decode (draft)"] += t2 - t1
        times["random resized crop"] += t3 - t2
        times["normalise (per image)"] += t4 - t3
        crops.append(image)
        captions.append(element["captions"][0])
    t0 = time.perf_counter()
    np.stack(crops)
    t1 = time.perf_counter()
    tok.encode_batch(captions)
    t2 = time.perf_counter()
    profiler.disable()
    times["stack (batch)"] = t1 - t0
    times["tokenize (batched)"] = t2 - t1
    stream = _Capture()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(6)
    return {k: 1000 * v / n for k, v in times.items()}, stream.text()


class _Capture:
    def __init__(self):
        self.parts: list[str] = []

    def write(self, s: str) -> None:
        self.parts.append(s)

    def text(self) -> str:
        lines = "".join(self.parts).splitlines()
        start = next((i for i, line in enumerate(lines) if "tottime" in line), 0)
        return "\n".join(lines[start:start + 7])


def measure_steps(models: list[str], batch: int) -> dict[str, float]:
    """Milliseconds per train step (PSD with the EMA teacher) on the local JAX backend."""
    import jax
    import jax.numpy as jnp

    from softalign.config import schema
    from softalign.models import build_model, model_preset
    from softalign.parallel import sharding
    from softalign.training.optim import make_optimizer
    from softalign.training.step import build_train_step, create_state, jit_train_step

    out = {}
    for name in models:
        c = schema.base_config()
        c.model = model_preset(name)
        size, ctx = c.model.vision.image_size, c.model.text.context_length
        mesh = sharding.make_mesh(1)
        model = build_model(c.model)
        c.psd.teacher, c.psd.subset_groups = "ema", 1  # the teacher whose pass costs the most; no host bank needed
        c.batch_size, c.num_steps = batch, 100
        tx, lr = make_optimizer(c.optim, c.num_steps)
        fn, teacher, _ = build_train_step(c, model=model, mesh=mesh, tx=tx, lr_schedule=lr)

        def init():
            params = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1, ctx), jnp.int32))
            return create_state(params["params"], tx, teacher, 0)

        shard = sharding.state_sharding(mesh, jax.eval_shape(init))
        state = jax.jit(init, out_shardings=shard)()
        step = jit_train_step(fn, mesh, shard)
        tokens = np.zeros((batch, ctx), np.int32)
        tokens[:, 0], tokens[:, 1:6], tokens[:, 6] = 1, 5, c.model.text.eot_id
        data = jax.device_put({"image": np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype(
            np.float32), "tokens": tokens}, sharding.batch_sharding(mesh))
        state, metrics, _ = step(state, data)         # compile + first step
        jax.block_until_ready(metrics)
        t0 = time.perf_counter()
        for _ in range(2):
            state, metrics, _ = step(state, data)
        jax.block_until_ready(metrics)
        out[name] = 1000 * (time.perf_counter() - t0) / 2
    return out


# ------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    root = args.keep or tempfile.mkdtemp(prefix="sa-input-bench-")
    os.makedirs(root, exist_ok=True)
    try:
        path, stats = make_dataset(root, args.num_images, args.width, args.height)
        cfg = pipeline.default_data_config()
        cfg.update(dict(source="arrayrecord", path=path, image_size=args.image_size))
        tok = corpus_tokenizer(sources.sample_captions(cfg, 5000), context_length=77, vocab_size=512)
        rows = []
        for threads in [int(t) for t in args.threads.split(",") if t.strip()]:
            cfg.update(dict(num_threads=threads, num_workers=0, prefetch_buffer_size=max(8, 4 * threads)))
            rate, first = time_pipeline(cfg, tok, args.batch, args.seconds)
            rows.append((f"in-process, {threads} read thread(s)", rate, first))
        for workers in [int(w) for w in args.workers.split(",") if w.strip() and int(w) > 0]:
            cfg.update(dict(num_threads=1, num_workers=workers, prefetch_buffer_size=8))
            rate, first = time_pipeline(cfg, tok, args.batch, args.seconds)
            rows.append((f"{workers} Grain worker process(es), 1 thread each", rate, first))
        cfg.update(dict(num_threads=2, num_workers=0))
        stage_ms, top = profile_stages(cfg, tok, args.profile_records)

        if args.step_ms:
            step_ms = {k.strip(): float(v) for k, v in (p.split("=") for p in args.step_ms.split(",") if p.strip())}
            step_batch, where = args.step_batch or 256, "given (--step_ms)"
        else:
            step_batch = args.step_batch or 8
            step_ms = measure_steps([m.strip() for m in args.models.split(",") if m.strip()], step_batch)
            import jax
            where = f"measured here on {jax.devices()[0].device_kind} ({jax.default_backend()})"
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    best = max(rows, key=lambda r: r[1])
    lines = [f"Input pipeline, {args.num_images} JPEGs {args.width}x{args.height} (~{stats.get('jpeg_kb', 0):.0f} kB) "
             f"-> {args.image_size} px train crops, batch {args.batch}; {os.cpu_count()} CPU cores "
             f"({platform.processor() or platform.machine()})", "",
             "| configuration | images/s | first batch (s) |", "|---|---:|---:|"]
    lines += [f"| {name} | {rate:,.0f} | {first:.1f} |" for name, rate, first in rows]
    lines += ["", f"Train-step consumption ({where}, per-chip batch {step_batch}):", "",
              "| model | step (ms) | images/s consumed per chip | best pipeline covers |", "|---|---:|---:|---:|"]
    for name, ms in step_ms.items():
        need = step_batch / (ms / 1000)
        lines.append(f"| {name} | {ms:,.0f} | {need:,.0f} | {best[1] / need:.2f}x of one chip |")
    slowest = max(stage_ms, key=stage_ms.get)
    lines += ["", f"Map-stage profile ({args.profile_records} records, ms per image):", "",
              "| stage | ms/image | share |", "|---|---:|---:|"]
    total = sum(stage_ms.values())
    lines += [f"| {k} | {v:.2f} | {v / total:.0%} |" for k, v in stage_ms.items()]
    lines += ["", f"Slowest stage: **{slowest}** ({stage_ms[slowest]:.2f} ms/image).", "",
              "cProfile, top functions by own time:", "", "```", top, "```", ""]
    if "convert_rec_s" in stats:
        lines.append(f"Generation {stats['generate_s']:.0f} s; conversion {stats['convert_rec_s']:,.0f} records/s.")
    lines.append("Command: `python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] +
                                               (sys.argv[1:] if argv is None else list(argv))) + "`")
    report = "\n".join(lines)
    print(report, flush=True)
    return report


if __name__ == "__main__":
    main()
