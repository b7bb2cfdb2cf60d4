"""Learning curves of a sweep's runs (their ``scalars.jsonl``): a metric against steps, the step at which each run
first reaches a target score, and the speed-up at equal score against a baseline method, seed by seed. This is
how TinyCLIP states its claim ("reaches the score of training from scratch 1.4-7.8x faster").

A target is a fixed score, or the baseline run's final value at each seed. A run reaches it at the first
evaluation at or above it, the step interpolated linearly from the evaluation before (a run already there at its
first evaluation reports that step, an upper bound marked ``≤``). The speed-up at a target is the baseline's steps
to reach it over the run's, both measured the same way.
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


def _target_label(target: float | None, baseline: str, metric: str) -> str:
    if target is None:
        return f"{baseline}'s final"
    return f"{100 * target:g}%" if is_fraction(metric) else f"{target:g}"


def speedups(root: str, metric: str, baseline: str, series: str = "method", seed_var: str = "seed",
             targets: Sequence[float | None] = (None,)) -> tuple[list[dict[str, Any]], dict[str, Curve]]:
    """A row per (target, method, seed): the run's final value, the target (None in ``targets``: the baseline's
    final value at that seed), the steps at which the run and the baseline first reach it, and the speed-up (the
    baseline's steps over the run's); and each run's curve, keyed by run name."""
    sweep = plan.read_json(os.path.join(root, plan.SWEEP_FILE))
    if sweep is None:
        raise plan.PlanError(f"no {plan.SWEEP_FILE} in {root}: launch the sweep first")
    runs = [{"run": e["name"], **e.get("variables", {})} for e in sweep.get("runs", [])]
    curves = {r["run"]: run_curve(os.path.join(root, r["run"]), metric) for r in runs}
    runs = [r for r in runs if curves[r["run"]]]
    base = {r.get(seed_var): curves[r["run"]] for r in runs if r.get(series) == baseline}
    if not base:
        raise plan.PlanError(f"no run of {series}={baseline} has logged eval/{metric} in {root}")
    out = []
    for spec in targets:
        for r in runs:
            curve, base_curve = curves[r["run"]], base.get(r.get(seed_var))
            target = spec if spec is not None else (base_curve[-1][1] if base_curve else None)
            row = {"target_label": _target_label(spec, baseline, metric), series: r.get(series),
                   seed_var: r.get(seed_var), "final": curve[-1][1], "target": target, "reach": None,
                   "bounded": False, "base_reach": None, "base_bounded": False, "speedup": None}
            if target is not None:
                reached = first_reach(curve, target)
                base_reached = first_reach(base_curve, target) if base_curve else None
                if reached:
                    row["reach"], row["bounded"] = reached
                if base_reached:
                    row["base_reach"], row["base_bounded"] = base_reached
                if reached and base_reached:
                    row["speedup"] = row["base_reach"] / row["reach"]
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


def _speedup_text(row: Mapping[str, Any]) -> str:
    """``2.40×``; ``≥`` when only the run reached the target at its first evaluation, ``≤`` when only the
    baseline did, ``~`` when both did."""
    if row["speedup"] is None:
        return "–"
    mark = {(True, False): "≥", (False, True): "≤", (True, True): "~"}.get((row["bounded"], row["base_bounded"]), "")
    return f"{mark}{row['speedup']:.2f}×"


def markdown(rows: Sequence[Mapping[str, Any]], metric: str, baseline: str, series: str = "method",
             seed_var: str = "seed") -> str:
    """A row per target and method: final score, steps to the target and the speed-up, per seed and mean."""
    scale = 100.0 if is_fraction(metric) else 1.0
    lines = [f"| target | {series} | final {metric} | steps to the target, per {seed_var} | speed-up over "
             f"{baseline}, per {seed_var} | speed-up |", "|---|---|---|---|---|---|"]
    for (label, method), members in groups(rows, ["target_label", series]).items():
        members = sorted(members, key=lambda r: str(r.get(seed_var)))
        finals = [scale * r["final"] for r in members]
        reach = " / ".join("never" if r["reach"] is None else f"{'≤' if r['bounded'] else ''}{r['reach']:.0f}"
                           for r in members)
        ups = [r["speedup"] for r in members if r["speedup"] is not None]
        missed = sum(r["speedup"] is None for r in members)
        mean_up = _mean_std(ups) + ("×" if ups else "") + (f" ({missed} not reached)" if missed else "")
        lines.append(f"| {label} | {format_value(method)} | {_mean_std(finals)} | {reach} | "
                     f"{' / '.join(_speedup_text(r) for r in members)} | {mean_up} |")
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
                  seed_var: str = "seed", targets: Sequence[float | None] = (None,)) -> dict[str, Any]:
    """Writes ``OUT/curves.md`` (the speed-up table) and ``OUT/curves.png``; returns their paths and the table."""
    out = out or os.path.join(root, "summary")
    os.makedirs(out, exist_ok=True)
    rows, curves = speedups(root, metric, baseline, series, seed_var, targets)
    table = markdown(rows, metric, baseline, series, seed_var)
    md_path = os.path.join(out, "curves.md")
    with open(md_path, "w") as f:
        f.write(f"{os.path.abspath(root)}: {metric}; {baseline}'s final = its final value at the same {seed_var}.\n\n")
        f.write(table + "\n")
    sweep = plan.read_json(os.path.join(root, plan.SWEEP_FILE))
    names = {(e.get("variables", {}).get(series), e.get("variables", {}).get(seed_var)): e["name"]
             for e in sweep.get("runs", [])}
    first = rows[0]["target_label"]
    png = plot([{**r, "seed": r[seed_var]} for r in rows if r["target_label"] == first], curves, names, metric,
               os.path.join(out, "curves.png"), series)
    return {"md": md_path, "png": png, "table": table, "rows": rows}
