"""Robustness to distribution shift: in-distribution vs shifted accuracy, as a table and a scatter plot.

Each point is one (in-distribution dataset, shifted dataset) pair for a model, e.g. ImageNet top-1 against
ImageNetV2 / -Sketch / -R top-1. A model that is as good under the shift as in distribution sits on the y = x line;
the vertical distance below it is the accuracy lost to the shift.

    robustness_report([("imagenetv2", 0.68, 0.62), ("imagenet-sketch", 0.68, 0.46)], "out/", model="ViT-B/16")

writes ``out/robustness.md`` (markdown table), ``out/robustness.csv`` and ``out/robustness.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Iterable, Union

import numpy as np


@dataclasses.dataclass(frozen=True)
class RobustnessPoint:
    """Accuracies as fractions in [0, 1]."""

    shift: str  # the shifted dataset (or "in-distribution -> shifted")
    in_distribution: float
    shifted: float
    model: str = ""

    @property
    def drop(self) -> float:
        return self.in_distribution - self.shifted

    @property
    def relative(self) -> float:
        """Shifted / in-distribution accuracy (NaN when the in-distribution accuracy is 0)."""
        return self.shifted / self.in_distribution if self.in_distribution > 0 else float("nan")


PointLike = Union[RobustnessPoint, tuple]


def _points(points: Iterable[PointLike], model: str) -> list[RobustnessPoint]:
    out = []
    for p in points:
        if not isinstance(p, RobustnessPoint):
            p = RobustnessPoint(str(p[0]), float(p[1]), float(p[2]), str(p[3]) if len(p) > 3 else "")
        p = dataclasses.replace(p, model=p.model or model)
        for value in (p.in_distribution, p.shifted):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{p.shift}: accuracies must be fractions in [0, 1], got {value}")
        out.append(p)
    if not out:
        raise ValueError("need at least one (shift, in-distribution accuracy, shifted accuracy) point")
    return out


def robustness_table(points: Iterable[PointLike], model: str = "model") -> list[dict[str, str]]:
    """Rows (as printed strings): model, shift, in-distribution %, shifted %, drop (points), relative %."""
    rows = []
    for p in _points(points, model):
        rows.append({"model": p.model, "shift": p.shift, "in_distribution_top1": f"{100 * p.in_distribution:.2f}",
                     "shifted_top1": f"{100 * p.shifted:.2f}", "drop": f"{100 * p.drop:.2f}",
                     "relative": f"{100 * p.relative:.1f}" if np.isfinite(p.relative) else "n/a"})
    return rows


def _markdown(rows: list[dict[str, str]]) -> str:
    headers = {"model": "model", "shift": "shifted dataset", "in_distribution_top1": "in-distribution top-1 (%)",
               "shifted_top1": "shifted top-1 (%)", "drop": "drop (points)", "relative": "shifted / in-dist. (%)"}
    keys = list(headers)
    lines = ["| " + " | ".join(headers[k] for k in keys) + " |",
             "|" + "|".join("---" if k in ("model", "shift") else "---:" for k in keys) + "|"]
    lines += ["| " + " | ".join(row[k] for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def robustness_report(points: Iterable[PointLike], out_dir: str, *, model: str = "model",
                      title: str = "Robustness to distribution shift", basename: str = "robustness"
                      ) -> dict[str, str]:
    """Writes `basename`.md, .csv and .png (scatter with the y = x line) into `out_dir`; returns their paths.

    `points`: `RobustnessPoint`s or tuples ``(shift, in_distribution_acc, shifted_acc[, model])``.
    """
    pts = _points(points, model)
    rows = robustness_table(pts, model)
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{basename}.{ext}") for ext in ("md", "csv", "png")}
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(f"# {title}\n\n{_markdown(rows)}")
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _scatter(pts, paths["png"], title)
    return paths


def _scatter(points: list[RobustnessPoint], path: str, title: str) -> None:
    # The Agg canvas directly, without pyplot: no display needed, and the caller's global backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = np.array([100 * p.in_distribution for p in points])
    y = np.array([100 * p.shifted for p in points])
    top = min(100.0, max(10.0, 1.1 * float(max(x.max(), y.max()))))
    fig = Figure(figsize=(5.5, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, top], [0, top], linestyle="--", color="grey", linewidth=1, label="y = x (no loss under shift)")
    models = sorted({p.model for p in points})
    for m, marker in zip(models, "osD^v<>ph*"):
        sel = [i for i, p in enumerate(points) if p.model == m]
        ax.scatter(x[sel], y[sel], marker=marker, s=40, label=m or None, zorder=3)
    for xi, yi, p in zip(x, y, points):
        ax.annotate(p.shift, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_aspect("equal")
    ax.set_xlabel("in-distribution top-1 (%)")
    ax.set_ylabel("shifted top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
