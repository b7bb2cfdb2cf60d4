"""Sweep plots (matplotlib, Agg canvas: no display): a metric against one swept variable, a line per method.

``plot_vs(rows, variables, x="noise", series="method", ...)`` keeps the finished runs of one slice of the grid:
the values of the other variables (all but ``x``, ``series`` and the seed) under which ``x`` takes the most
levels. For "methods x noise at fraction 1, fractions at noise 0.5" that is fraction = 1 for the noise plot and
noise = 0.5 for the fraction plot; methods run only at one point of the slice (e.g. other teachers at noise 0.5)
show as single markers. Each point is the mean over seeds, with a bar from the lowest to the highest seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from softalign.sweep.grid import format_value
from softalign.sweep.rows import groups
from softalign.workdir import is_fraction


def _number(value: Any) -> float | None:
    """``value`` as a float for a numeric x axis, or None (strings, booleans)."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def grid_slice(rows: Sequence[Mapping[str, Any]], variables: Sequence[str], x: str, series: str,
               seed_var: str) -> tuple[dict[str, Any], list[Mapping[str, Any]]]:
    """``(fixed values, rows)`` of the slice in which ``x`` has the most distinct values (ties: most runs)."""
    others = [v for v in variables if v not in (x, series, seed_var)]
    best_key, best, best_score = (), [], (0, 0)
    for key, members in groups(rows, others).items():
        score = (len({repr(r.get(x)) for r in members}), len(members))
        if score > best_score:
            best_key, best, best_score = key, members, score
    return dict(zip(others, best_key)), best


def plot_vs(rows: Sequence[Mapping[str, Any]], variables: Sequence[str], *, x: str, series: str,
            metrics: Sequence[str], path: str, seed_var: str = "seed") -> str | None:
    """Writes one PNG with a panel per metric (mean over seeds, min-max bars) against ``x``, a line per value of
    ``series``; returns ``path``, or None when ``x`` is not swept (fewer than two levels) or there are no metrics."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    finished = [r for r in rows if r.get("status") == "finished"]
    if x not in variables or not metrics:
        return None
    fixed, members = grid_slice(finished, variables, x, series, seed_var)
    levels = []
    for r in members:
        if r.get(x) not in levels:
            levels.append(r.get(x))
    if len(levels) < 2:
        return None
    numeric = all(_number(v) is not None for v in levels)
    position = {repr(v): (_number(v) if numeric else i) for i, v in enumerate(levels)}
    by_series = groups(members, [series] if series in variables else [])

    cols = min(3, len(metrics))
    nrows = -(-len(metrics) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * nrows), dpi=100)
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(nrows, cols, i + 1)
        scale = 100.0 if is_fraction(metric) else 1.0
        for key, series_rows in by_series.items():
            points = []
            for level, level_rows in groups(series_rows, [x]).items():
                values = [scale * r[metric] for r in level_rows if isinstance(r.get(metric), (int, float))]
                if values:
                    points.append((position[repr(level[0])], sum(values) / len(values), min(values), max(values)))
            if not points:
                continue
            points.sort()
            xs, means, lows, highs = zip(*points)
            label = format_value(key[0]) if key and key[0] is not None else "runs"
            # clamped: the mean of equal values can round a last bit past them, and matplotlib rejects a negative bar
            yerr = [[max(m - lo, 0.0) for m, lo in zip(means, lows)], [max(h - m, 0.0) for m, h in zip(means, highs)]]
            ax.errorbar(xs, means, yerr=yerr, marker="o", capsize=3, label=label)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel(x)
        ax.set_ylabel(f"{metric.rsplit('/', 1)[-1]}{' (%)' if scale == 100.0 else ''}")
        if not numeric:
            ax.set_xticks(range(len(levels)), [format_value(v) for v in levels])
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    where = ", ".join(f"{k}={format_value(v)}" for k, v in fixed.items() if v is not None)
    seeds = "mean over seeds, bars min-max" if seed_var in variables else "one run per point"
    fig.suptitle(f"metrics vs {x}{f' at {where}' if where else ''} ({seeds})", fontsize=11)
    fig.tight_layout()
    FigureCanvasAgg(fig).print_png(path)
    return path
