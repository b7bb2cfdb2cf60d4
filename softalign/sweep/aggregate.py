"""Sweep results: one row per run (swept variables, final metrics, wall time, final train loss) as CSV, a markdown
table of mean ± std over seeds, and plots (`softalign.sweep.plots`).

Reads ``ROOT/sweep.json`` (written by the launcher) for the runs and their variables, and from each run's
directory ``eval_results.json`` (the final evaluation, ``{"step", "results": {eval: {metric: value}}}``),
``done.json`` (written by train.py at completion: final step, last train metrics) and ``launch.json`` (the
launcher's attempts; their seconds are summed into the run's wall time).
"""

from __future__ import annotations

import csv
import fnmatch
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from softalign.sweep import plan, plots
from softalign.sweep.grid import format_value
from softalign.sweep.rows import groups
from softalign.workdir import is_fraction

DEFAULT_METRICS: tuple[str, ...] = ("*/i2t_R@1", "*/i2t_R@5", "*/t2i_R@1", "*/t2i_R@5", "*/top1")
FIXED_COLUMNS: tuple[str, ...] = ("step", "wall_seconds", "train_loss")


def wall_seconds(workdir: str, done: Mapping[str, Any] | None) -> float | None:
    """Seconds over all the launcher's attempts of a run (launch.json), else the finishing process's (done.json)."""
    launched = plan.read_json(os.path.join(workdir, plan.LAUNCH_FILE))
    if launched and launched.get("attempts"):
        return round(sum(float(a.get("seconds", 0.0)) for a in launched["attempts"]), 3)
    if done and done.get("wall_seconds") is not None:
        return float(done["wall_seconds"])
    return None


def collect(root: str) -> tuple[list[str], list[dict[str, Any]], list[str]]:
    """``(variables, rows, metric columns)`` for the sweep in ``root``; a row per run of sweep.json."""
    sweep = plan.read_json(os.path.join(root, plan.SWEEP_FILE))
    if sweep is None:
        raise plan.PlanError(f"no {plan.SWEEP_FILE} in {root}: launch the sweep first "
                             "(python -m softalign.sweep launch --sweep=... --root=...)")
    variables = list(sweep.get("variables", []))
    rows, metrics = [], []
    for entry in sweep.get("runs", []):
        workdir = os.path.join(root, entry["name"])
        done = plan.read_json(os.path.join(workdir, plan.DONE_FILE))
        results = plan.read_json(os.path.join(workdir, plan.RESULTS_FILE)) or {}
        row: dict[str, Any] = {"run": entry["name"], "status": plan.run_status(workdir)}
        row.update({v: entry.get("variables", {}).get(v) for v in variables})
        row["step"] = results.get("step")
        row["wall_seconds"] = wall_seconds(workdir, done)
        row["train_loss"] = ((done or {}).get("train") or {}).get("train/loss")
        for name, values in sorted((results.get("results") or {}).items()):
            for key, value in values.items():
                column = f"{name}/{key}"
                row[column] = value
                if column not in metrics:
                    metrics.append(column)
        rows.append(row)
    return variables, rows, metrics


def select_metrics(metrics: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The metric columns matching any of ``patterns`` (fnmatch, e.g. ``*/i2t_R@1``), in pattern order."""
    chosen: list[str] = []
    for pattern in patterns:
        chosen.extend(m for m in metrics if fnmatch.fnmatchcase(m, pattern) and m not in chosen)
    return chosen


def write_csv(path: str, variables: Sequence[str], rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> None:
    """One row per run: run, status, each variable, step, wall_seconds, train_loss, each metric."""
    columns = ["run", "status", *variables, *FIXED_COLUMNS, *metrics]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _cell(values: Sequence[float], percent: bool) -> str:
    """A table cell: mean ± std of ``values`` (in % when ``percent``), the mean alone for one value."""
    if not values:
        return ""
    scale = 100.0 if percent else 1.0
    m, s = mean_std([scale * v for v in values])
    digits = 1 if percent else 3
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown_table(variables: Sequence[str], rows: Sequence[Mapping[str, Any]], metrics: Sequence[str],
                   seed_var: str = "seed") -> str:
    """Finished runs grouped over every variable but ``seed_var``: mean ± std over seeds of each metric (accuracies
    and recalls in %), the number of seeds and the mean wall time."""
    keys = [v for v in variables if v != seed_var]
    finished = [r for r in rows if r["status"] == "finished"]
    header = [*keys, "seeds", *(f"{m} (%)" if is_fraction(m) else m for m in metrics), "wall (min)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for key, members in groups(finished, keys).items():
        cells = ["" if v is None else format_value(v) for v in key] + [str(len(members))]
        for m in metrics:
            cells.append(_cell([r[m] for r in members if isinstance(r.get(m), (int, float))], is_fraction(m)))
        walls = [r["wall_seconds"] / 60 for r in members if isinstance(r.get("wall_seconds"), (int, float))]
        cells.append(f"{sum(walls) / len(walls):.1f}" if walls else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def aggregate(root: str, out: str = "", metric_patterns: Sequence[str] = DEFAULT_METRICS,
              x_vars: Sequence[str] = ("noise", "fraction"), series: str = "method",
              seed_var: str = "seed") -> dict[str, Any]:
    """Writes ``OUT/results.csv``, ``OUT/results.md`` and one ``OUT/metrics_vs_<x>.png`` per x variable (a panel
    per metric; OUT defaults to ROOT/summary); returns their paths, the table and counts."""

    out = out or os.path.join(root, "summary")
    os.makedirs(out, exist_ok=True)
    variables, rows, metrics = collect(root)
    chosen = select_metrics(metrics, metric_patterns)
    csv_path = os.path.join(out, "results.csv")
    write_csv(csv_path, variables, rows, metrics)
    table = markdown_table(variables, rows, chosen, seed_var)
    finished = sum(r["status"] == "finished" for r in rows)
    md_path = os.path.join(out, "results.md")
    with open(md_path, "w") as f:
        f.write(f"{finished} of {len(rows)} runs finished ({os.path.abspath(root)}); mean ± std over seeds.\n\n")
        f.write(table + "\n")
    pngs = []
    for x in x_vars:
        path = plots.plot_vs(rows, variables, x=x, series=series, metrics=chosen, seed_var=seed_var,
                             path=os.path.join(out, f"metrics_vs_{x}.png"))
        if path:
            pngs.append(path)
    return {"csv": csv_path, "md": md_path, "pngs": pngs, "table": table, "runs": len(rows), "finished": finished,
            "metrics": chosen}
