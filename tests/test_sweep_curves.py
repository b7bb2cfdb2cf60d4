"""Tests for softalign.sweep.curves: curves from scalars.jsonl, the interpolated step at a target, the speed-up
against a baseline's final score per seed, and the CLI's table and plot."""

from __future__ import annotations

import json
import os

import pytest

from softalign.sweep import curves, plan
from softalign.sweep.__main__ import main
from softalign.workdir import SCALARS_FILE

METRIC = "heldout/i2t_R@5"


def _run(root, name, variables, points, extra_keys=True):
    """A run folder whose scalars file logs ``points`` [(step, value)] of the metric (and train lines between)."""
    os.makedirs(os.path.join(root, name))
    with open(os.path.join(root, name, SCALARS_FILE), "w") as f:
        for step, value in points:
            if extra_keys:
                f.write(json.dumps({"step": step, "train/loss": 1.0}) + "\n")
            f.write(json.dumps({"step": step, f"eval/{METRIC}": value}) + "\n")
    return {"name": name, "overrides": {}, "tags": variables, "variables": variables}


@pytest.fixture
def sweep_root(tmp_path):
    root = str(tmp_path / "sw")
    runs = [
        _run(root, "scratch0", {"method": "scratch", "seed": 0}, [(100, 0.1), (200, 0.2), (300, 0.3), (400, 0.4)]),
        _run(root, "fast0", {"method": "fast", "seed": 0}, [(100, 0.2), (200, 0.5), (300, 0.6), (400, 0.6)]),
        _run(root, "scratch1", {"method": "scratch", "seed": 1}, [(100, 0.3), (400, 0.5)]),
        _run(root, "fast1", {"method": "fast", "seed": 1}, [(100, 0.55), (400, 0.7)]),
        _run(root, "slow0", {"method": "slow", "seed": 0}, [(100, 0.0), (400, 0.1)]),
        _run(root, "empty0", {"method": "empty", "seed": 0}, []),
    ]
    with open(os.path.join(root, plan.SWEEP_FILE), "w") as f:
        json.dump({"variables": ["method", "seed"], "runs": runs}, f)
    return root


def test_first_reach_interpolates_bounds_and_misses():
    curve = [(100, 0.2), (200, 0.5), (300, 0.6)]
    assert curves.first_reach(curve, 0.4) == pytest.approx((100 + 100 * (0.2 / 0.3), False))
    assert curves.first_reach(curve, 0.5) == (200.0, False)
    assert curves.first_reach(curve, 0.1) == (100.0, True)
    assert curves.first_reach(curve, 0.61) is None
    assert curves.first_reach([], 0.1) is None


def test_speedups_pair_seeds_with_the_baseline(sweep_root):
    rows, runs = curves.speedups(sweep_root, METRIC, baseline="scratch")  # target: scratch's final
    by = {(r["method"], r["seed"]): r for r in rows}
    assert ("empty", 0) not in by  # no evaluation logged: left out
    # seed 0: target 0.4 (scratch's final, at step 400); fast reaches it between 100 (0.2) and 200 (0.5)
    fast0 = by[("fast", 0)]
    assert fast0["target"] == 0.4 and fast0["reach"] == pytest.approx(100 + 100 * 0.2 / 0.3)
    assert fast0["speedup"] == pytest.approx(400 / fast0["reach"])
    # seed 1: target 0.5, reached at the first evaluation: an upper bound on the step, a lower bound on the speed-up
    assert by[("fast", 1)]["bounded"] and by[("fast", 1)]["speedup"] == pytest.approx(4.0)
    assert by[("scratch", 0)]["speedup"] == pytest.approx(1.0)  # reaches its own final at its last evaluation
    assert by[("slow", 0)]["reach"] is None and by[("slow", 0)]["speedup"] is None
    assert runs["fast0"][1] == (200, 0.5)


def test_curves_cli_writes_table_and_plot(sweep_root, capsys):
    assert main(["curves", f"--root={sweep_root}", f"--metric={METRIC}", "--baseline=scratch"]) == 0
    printed = capsys.readouterr().out
    assert "| scratch's final | fast | 65 ± 7.1 | 167 / ≤100 | 2.40× / ≥4.00× | 3.2 ± 1.1× |" in printed
    assert "| scratch's final | slow | 10 | never | – | – (1 not reached) |" in printed
    summary = os.path.join(sweep_root, "summary")
    assert os.path.getsize(os.path.join(summary, "curves.png")) > 1000
    assert "scratch's final = its final value" in open(os.path.join(summary, "curves.md")).read()


def test_fixed_targets_measure_both_sides_the_same_way(sweep_root):
    rows, _ = curves.speedups(sweep_root, METRIC, baseline="scratch", targets=(0.3,))
    by = {(r["method"], r["seed"]): r for r in rows}
    # seed 0: scratch reaches 0.3 at step 300, fast between 100 (0.2) and 200 (0.5): 133.3
    assert by[("scratch", 0)]["base_reach"] == 300.0 and by[("fast", 0)]["reach"] == pytest.approx(400 / 3)
    assert by[("fast", 0)]["speedup"] == pytest.approx(300 / (400 / 3))
    # seed 1: both at their first evaluation: a speed-up of 1 that is marked as unresolved
    assert by[("fast", 1)]["bounded"] and by[("fast", 1)]["base_bounded"]
    assert curves._speedup_text(by[("fast", 1)]) == "~1.00×"
    assert by[("slow", 0)]["target_label"] == "30%" and by[("slow", 0)]["speedup"] is None


def test_curves_without_the_baseline_is_a_clear_error(sweep_root, capsys):
    assert main(["curves", f"--root={sweep_root}", "--baseline=nope"]) == 2
    assert "no run of method=nope" in capsys.readouterr().err
