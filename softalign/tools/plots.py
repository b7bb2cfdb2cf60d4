"""Small matplotlib figures for the tools, drawn on the Agg canvas (no display, the global backend left alone)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def _figure(size=(5.5, 4.5)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def fit_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares ``y = slope * x + intercept`` and Pearson r (NaNs when fewer than two distinct x)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or np.ptp(x) == 0:
        return float("nan"), float("nan"), float("nan")
    slope, intercept = np.polyfit(x, y, 1)
    r = float(np.corrcoef(x, y)[0, 1]) if np.ptp(y) > 0 else float("nan")
    return float(slope), float(intercept), r


def scatter_fit(path: str, x: Sequence[float], y: Sequence[float], labels: Sequence[str], *, xlabel: str,
                ylabel: str, title: str, fit: Optional[tuple[float, float, float]] = None) -> None:
    """Labelled points, and the fitted line with its slope in the legend when `fit` = (slope, intercept, r)."""
    fig, ax = _figure()
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ax.scatter(x, y, s=30, zorder=3)
    for xi, yi, label in zip(x, y, labels):
        ax.annotate(label, (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
    if fit is not None and np.isfinite(fit[0]):
        grid = np.linspace(x.min(), x.max(), 2)
        ax.plot(grid, fit[0] * grid + fit[1], color="C3", linewidth=1.2,
                label=f"slope {fit[0]:.2f} per decade (r = {fit[2]:.2f})")
        ax.legend(fontsize=8, loc="best")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def path_plot(path: str, x: Sequence[float], y: Sequence[float], labels: Sequence[str], *, xlabel: str,
              ylabel: str, title: str) -> None:
    """Points joined in order (e.g. one per mixing coefficient), each labelled, with the y = x line."""
    fig, ax = _figure((5.5, 5.0))
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    lo = max(0.0, min(x.min(), y.min()) - 2)
    hi = min(100.0, max(x.max(), y.max()) + 2)
    ax.plot([lo, hi], [lo, hi], linestyle="--", color="grey", linewidth=1, label="y = x")
    ax.plot(x, y, marker="o", zorder=3, label="interpolation path")
    for xi, yi, label in zip(x, y, labels):
        ax.annotate(label, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
