"""Learning curves of a sweep's runs (their ``scalars.jsonl``): a metric against steps, the step at which each run
first reaches a target score, and the speed-up at equal score against a baseline method, seed by seed. This is
how TinyCLIP states its claim ("reaches the score of training from scratch 1.4-7.8x faster").

The target of a seed is the baseline run's final value of the metric at that seed; a run reaches it at the first
evaluation whose value is at least the target, with the step interpolated linearly from the evaluation before
(a run at or above the target at its first evaluation reports that step, an upper bound marked ``≤``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from softalign.sweep import plan
from softalign.sweep.grid import format_value
from softalign.sweep.rows import groups
from softalign.workdir import SCALARS_FILE, is_fraction, read_scalars

Curve = list[tuple[int, float]]


def run_curve(workdir: str, metric: str) -> Curve:
    """``[(step, value)]`` of ``eval/<metric>`` in a run's scalars file, by step (empty when never logged)."""
    key = metric if metric.startswith("eval/") else f"eval/{metric}"
    return [(step, row[key]) for step, row in read_scalars(os.path.join(workdir, SCALARS_FILE)).items() if key in row]


def first_reach(curve: Curve, target: float) -> tuple[float, bool] | None:
    """``(step, bounded)``: the first step the curve reaches ``target`` (interpolated between evaluations), with
    ``bounded`` True when it was reached at the first evaluation (the true step is at most that); None if never."""
    previous = None
    for step, value in curve:
        if value >= target:
            if previous is None:
                return float(step), True
            (s0, v0) = previous
            return s0 + (step - s0) * (target - v0) / (value - v0), False
        previous = (step, value)
    return None


def speedups(root: str, metric: str, baseline: str, series: str = "method",
             seed_var: str = "seed") -> tuple[list[dict[str, Any]], dict[Any, Curve]]:
    """Per (method, seed): the final value, the baseline's final value at that seed (the target), the step the run
    first reaches it and the speed-up (baseline's steps to its own final value, i.e. its last evaluation, over the
    run's); and each run's curve, keyed by run name."""
    sweep = plan.read_json(os.path.join(root, plan.SWEEP_FILE))
    if sweep is None:
        raise plan.PlanError(f"no {plan.SWEEP_FILE} in {root}: launch the sweep first")
    runs = [{"run": e["name"], **e.get("variables", {})} for e in sweep.get("runs", [])]
    curves = {r["run"]: run_curve(os.path.join(root, r["run"]), metric) for r in runs}
    runs = [r for r in runs if curves[r["run"]]]
    targets = {r.get(seed_var): curves[r["run"]][-1] for r in runs if r.get(series) == baseline}
    if not targets:
        raise plan.PlanError(f"no run of {series}={baseline} has logged eval/{metric} in {root}")
    out = []
    for r in runs:
        curve = curves[r["run"]]
        target_step, target = targets.get(r.get(seed_var), (None, None))
        row = {series: r.get(series), seed_var: r.get(seed_var), "final": curve[-1][1], "final_step": curve[-1][0],
               "target": target, "reach": None, "bounded": False, "speedup": None}
        reached = first_reach(curve, target) if target is not None else None
        if reached is not None:
            row["reach"], row["bounded"] = reached
            row["speedup"] = target_step / row["reach"]
        out.append(row)
    return out, curves


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.3g}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.3g} ± {std:.2g}"


def markdown(rows: Sequence[Mapping[str, Any]], metric: str, baseline: str, series: str = "method",
             seed_var: str = "seed") -> str:
    """A row per method: final score, steps to the baseline's final score and the speed-up, per seed and mean."""
    scale = 100.0 if is_fraction(metric) else 1.0
    lines = [f"| {series} | final {metric} | steps to {baseline}'s final, per {seed_var} | speed-up per {seed_var} "
             "| speed-up |", "|---|---|---|---|---|"]
    for (method,), members in groups(rows, [series]).items():
        members = sorted(members, key=lambda r: str(r.get(seed_var)))
        finals = [scale * r["final"] for r in members]
        reach = " / ".join("never" if r["reach"] is None else f"{'≤' if r['bounded'] else ''}{r['reach']:.0f}"
                           for r in members)
        ups = [r["speedup"] for r in members if r["speedup"] is not None]
        per_seed = " / ".join("–" if r["speedup"] is None else f"{'≥' if r['bounded'] else ''}{r['speedup']:.2f}×"
                              for r in members)
        missed = sum(r["speedup"] is None for r in members)
        mean_up = _mean_std(ups) + ("×" if ups else "") + (f" ({missed} never)" if missed else "")
        lines.append(f"| {format_value(method)} | {_mean_std(finals)} | {reach} | {per_seed} | {mean_up} |")
    return "\n".join(lines)


def plot(rows: Sequence[Mapping[str, Any]], curves: Mapping[str, Curve], runs: Mapping[tuple, str], metric: str,
         path: str, series: str = "method") -> str:
    """One PNG: the metric against steps, a thin line per run and a thick mean line per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scale = 100.0 if is_fraction(metric) else 1.0
    fig = Figure(figsize=(6.0, 4.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for i, ((method,), members) in enumerate(groups(rows, [series]).items()):
        colour = f"C{i}"
        member_curves = [curves[runs[(r[series], r["seed"])]] for r in members]
        for c in member_curves:
            ax.plot([s for s, _ in c], [scale * v for _, v in c], color=colour, alpha=0.3, lw=0.8)
        steps = sorted(set.intersection(*(set(s for s, _ in c) for c in member_curves)))
        means = [sum(scale * dict(c)[s] for c in member_curves) / len(member_curves) for s in steps]
        ax.plot(steps, means, color=colour, lw=2, marker="o", ms=3, label=format_value(method))
    ax.set_xlabel("step")
    ax.set_ylabel(f"{metric}{' (%)' if scale == 100.0 else ''}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"{metric} against steps (thin: each seed, thick: mean)", fontsize=10)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(path)
    return path


def curves_report(root: str, metric: str, baseline: str, out: str = "", series: str = "method",
                  seed_var: str = "seed") -> dict[str, Any]:
    """Writes ``OUT/curves.md`` (the speed-up table) and ``OUT/curves.png``; returns their paths and the table."""
    out = out or os.path.join(root, "summary")
    os.makedirs(out, exist_ok=True)
    rows, curves = speedups(root, metric, baseline, series, seed_var)
    table = markdown(rows, metric, baseline, series, seed_var)
    md_path = os.path.join(out, "curves.md")
    with open(md_path, "w") as f:
        f.write(f"{os.path.abspath(root)}: {metric}; target = {baseline}'s final value at the same {seed_var}.\n\n")
        f.write(table + "\n")
    sweep = plan.read_json(os.path.join(root, plan.SWEEP_FILE))
    names = {(e.get("variables", {}).get(series), e.get("variables", {}).get(seed_var)): e["name"]
             for e in sweep.get("runs", [])}
    png = plot([{**r, "seed": r[seed_var]} for r in rows], curves, names, metric,
               os.path.join(out, "curves.png"), series)
    return {"md": md_path, "png": png, "table": table, "rows": rows}
