"""What a run directory holds, by name, and the two file operations every layer needs (standard library only).

Training writes these files, evaluation and conversion read them, and the sweep tools read ``done.json`` without
importing JAX, so the names live here, at the bottom of the import graph.
"""

from __future__ import annotations

import json
import os
from typing import Any

CHECKPOINTS_DIR = "checkpoints"  # Orbax checkpoints, one folder per step
TOKENIZER_FILE = "tokenizer.json"  # the vocabulary the run trained (reused on resume)
RESULTS_FILE = "eval_results.json"  # the final evaluation
DONE_FILE = "done.json"  # written last when a run completes: how sweeps tell finished runs
CONFIG_FILE = "config.json"  # the resolved config (vocab and eot filled in), for softalign.load and the tools
SCALARS_FILE = "scalars.jsonl"  # every logged scalar (train and periodic evals), one JSON line per logging call


def is_fraction(metric: str) -> bool:
    """Whether a metric in ``eval_results.json`` is an accuracy/recall fraction in [0, 1] (shown in %), not a
    rank, count or loss. ``metric`` may carry a ``name/`` prefix (``eval/heldout/i2t_R@5``)."""
    return any(part in metric.rsplit("/", 1)[-1] for part in ("top", "recall", "R@", "mAP"))


def checkpoints_dir(workdir: str) -> str:
    """``WORKDIR/checkpoints``."""
    return os.path.join(workdir, CHECKPOINTS_DIR)


def write_json_atomic(path: str, payload: Any) -> None:
    """Writes ``payload`` as indented JSON next to ``path`` and renames it into place, so readers never see a
    partial file. Works for local paths and, through etils, for remote ones (``gs://``)."""
    text = json.dumps(payload, indent=2, sort_keys=True)
    if "://" in path:
        from etils import epath  # remote workdirs only; keeps this module importable without etils

        staged = epath.Path(path + ".tmp")
        staged.write_text(text)
        staged.rename(epath.Path(path))
        return
    staged = path + ".tmp"
    with open(staged, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staged, path)


def read_json(path: str) -> Any:
    """The JSON at ``path``, or None when it is missing or unreadable (e.g. a run killed mid-write)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_done(workdir: str) -> dict[str, Any] | None:
    """The run's ``done.json`` (final step, num_steps, wall seconds, train metrics), or None if unfinished."""
    done = read_json(os.path.join(workdir, DONE_FILE))
    return done if isinstance(done, dict) else None


def read_scalars(path: str) -> dict[int, dict[str, float]]:
    """A `JsonlWriter` file as ``{step: {name: value}}``, lines of one step merged (a later line wins: a resumed
    run's redo of a step replaces the first). A missing file is empty; a torn last line (a killed run) is skipped."""
    out: dict[int, dict[str, float]] = {}
    if not os.path.exists(path):
        return out
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = int(row.pop("step"))
            out.setdefault(step, {}).update(row)
    return dict(sorted(out.items()))
