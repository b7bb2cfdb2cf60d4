"""Per-device temp memory of the PSD loss + gradient against global batch, chunked vs unchunked.

Compiles (never runs) ``value_and_grad`` of ``infonce.psd_loss`` on virtual CPU devices, with the self teacher and
soft targets on, and reads ``compiled.memory_analysis().temp_size_in_bytes``. Two sweeps:
  * 8 devices, B growing (b = B/8 grows too): unchunked grows as b x B, chunked as b x c;
  * b fixed per device, N = B/b devices (up to 64): unchunked still grows as b x B, chunked is flat.
A third table does the fixed-b sweep for SigLIP's sigmoid loss (``siglip.sigmoid_loss``, ring + chunk form).

    python benchmarks/loss_memory.py                       # table (markdown) and docs/loss_memory.png
    python benchmarks/loss_memory.py --losses sigmoid      # only the sigmoid table
    python benchmarks/loss_memory.py --budget_gib 2        # also: the largest global batch under 2 GiB per device
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=64")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from softalign.objectives import infonce, siglip  # noqa: E402
from softalign.parallel import sharding  # noqa: E402


def temp_bytes(batch: int, dim: int, chunk: int, mesh) -> int:
    """Compiles the loss and its gradient for a global batch; returns per-device temp bytes."""
    row = sharding.batch_sharding(mesh)
    emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=row)
    subset = jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=row)

    def f(u, v, s):
        loss, _ = infonce.psd_loss(u, v, 14.0, alpha=0.5, subset=s, teacher=None, tau=0.5, mesh=mesh,
                                  chunk_size=chunk)
        return loss

    compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(emb, emb, subset).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def sigmoid_temp_bytes(batch: int, dim: int, chunk: int, mesh) -> int:
    """The same for SigLIP's sigmoid loss, with gradients to both embeddings, the scale and the bias."""
    emb = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=sharding.batch_sharding(mesh))
    scalar = jax.ShapeDtypeStruct((), jnp.float32)

    def f(u, v, s, b):
        return siglip.sigmoid_loss(u, v, s, b, mesh=mesh, chunk_size=chunk)[0]

    compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3))).lower(emb, emb, scalar, scalar).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def sigmoid_table(batches: list[int], per_device: int, dim: int, chunk: int) -> None:
    """Per-device temp memory of the sigmoid loss at fixed b, N = B/b devices, unchunked vs chunked."""
    rows = []
    for b in batches:
        n = b // per_device
        if n < 1 or n > len(jax.devices()) or b % per_device:
            continue
        m = sharding.make_mesh(n)
        rows.append((b, n, sigmoid_temp_bytes(b, dim, 0, m), sigmoid_temp_bytes(b, dim, chunk, m)))
        print(f"sigmoid, fixed b: B={b} on {n} devices", file=sys.stderr, flush=True)
    print(f"\nSigLIP sigmoid loss + gradient, fixed per-device batch b = {per_device}, D={dim}, chunk c={chunk}\n")
    print("| global batch B | devices N | unchunked (MiB) | chunked (MiB) | ratio |")
    print("|---|---|---|---|---|")
    for b, n, full, chunked in rows:
        print(f"| {b:,} | {n} | {full / 2**20:,.1f} | {chunked / 2**20:,.1f} | {full / max(chunked, 1):.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1024,4096,16384,32768,65536")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--budget_gib", type=float, default=2.0)
    parser.add_argument("--per_device", type=int, default=1024, help="b for the fixed-per-device sweep")
    parser.add_argument("--plot", default=os.path.join("docs", "loss_memory.png"))
    parser.add_argument("--losses", default="infonce,sigmoid", help="which tables: infonce, sigmoid or both")
    args = parser.parse_args()
    losses = args.losses.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    if "sigmoid" in losses:
        sigmoid_table(batches, args.per_device, args.dim, args.chunk)
    if "infonce" not in losses:
        return
    mesh = sharding.make_mesh(8)  # the first sweep; the second uses N = B / per_device devices
    rows = []
    for b in batches:
        rows.append((b, temp_bytes(b, args.dim, 0, mesh), temp_bytes(b, args.dim, args.chunk, mesh)))
        print(f"B={b}: unchunked {rows[-1][1] / 2**20:.1f} MiB, chunked {rows[-1][2] / 2**20:.1f} MiB",
              file=sys.stderr, flush=True)
    print(f"Per-device temp memory of loss + gradient, 8 devices, D={args.dim}, chunk c={args.chunk}\n")
    print("| global batch B | per device b | unchunked (MiB) | chunked (MiB) | ratio |")
    print("|---|---|---|---|---|")
    for b, full, chunked in rows:
        print(f"| {b:,} | {b // 8:,} | {full / 2**20:,.1f} | {chunked / 2**20:,.1f} | {full / max(chunked, 1):.1f}x |")
    per_device = args.per_device
    flat = []
    for b in batches:
        n = b // per_device
        if n < 1 or n > len(jax.devices()):
            continue
        m = sharding.make_mesh(n)
        flat.append((b, n, temp_bytes(b, args.dim, 0, m), temp_bytes(b, args.dim, args.chunk, m)))
        print(f"fixed b: B={b} on {n} devices", file=sys.stderr, flush=True)
    print(f"\nFixed per-device batch b = {per_device}: N = B/b devices\n")
    print("| global batch B | devices N | unchunked (MiB) | chunked (MiB) |")
    print("|---|---|---|---|")
    for b, n, full, chunked in flat:
        print(f"| {b:,} | {n} | {full / 2**20:,.1f} | {chunked / 2**20:,.1f} |")
    budget = args.budget_gib * 2**30
    for name, col in (("unchunked", 1), ("chunked", 2)):
        fits = [r[0] for r in rows if r[col] <= budget]
        # temp memory is close to linear (chunked) or quadratic (unchunked) in B: extrapolate from the largest point
        b, used = rows[-1][0], rows[-1][col]
        power = 2.0 if col == 1 else 1.0
        estimate = int(b * (budget / used) ** (1 / power))
        print(f"\nLargest measured B within {args.budget_gib:g} GiB/device, {name}: "
              f"{max(fits) if fits else 'none'} (extrapolated: ~{estimate:,})")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib not installed: no plot)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    series = ((axes[0], [r[0] for r in rows], rows, 1, "global batch B (8 devices)"),
              (axes[1], [r[0] for r in flat], [(r[0],) + r[2:] for r in flat], 1,
               f"global batch B (b = {per_device} per device, N = B/b)"))
    for ax, xs, data, _, label in series:
        ax.loglog(xs, [r[1] / 2**20 for r in data], "o-", label="unchunked (b x B)")
        ax.loglog(xs, [r[2] / 2**20 for r in data], "s-", label=f"chunked (c = {args.chunk})")
        ax.set_xlabel(label)
        ax.set_ylabel("temp MiB per device")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot)
    print(f"\nplot: {args.plot}\ncommand: python benchmarks/loss_memory.py")


if __name__ == "__main__":
    main()
