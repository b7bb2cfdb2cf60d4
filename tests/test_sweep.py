"""Sweep tooling: grid helpers (no subprocesses), the launcher's bookkeeping with a stand-in for python, and one
tiny grid end to end (launch, resume, aggregate) with configs/sweeps/synthetic_tiny.py."""

import csv
import io
import json
import os
import subprocess
import sys

import pytest

from softalign.config.schema import base_config
from softalign.sweep import aggregate, grid, launch, plan, plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "sweeps", "synthetic_tiny.py")
METHODS = {"clip": {"psd.alpha_max": 0.0}, "psd-ema": {"psd.teacher": "ema"}, "psd-self": {"psd.teacher": "self"}}


def test_product_names_and_overrides():
    runs = grid.product(method=grid.pick(METHODS, "clip", "psd-ema"), noise=[0.0, 0.2], seed=[0])
    assert [r.name for r in runs] == ["method=clip,noise=0,seed=0", "method=clip,noise=0.2,seed=0",
                                      "method=psd-ema,noise=0,seed=0", "method=psd-ema,noise=0.2,seed=0"]
    assert runs[1].overrides == {"psd.alpha_max": 0.0, "data.caption_noise": 0.2, "seed": 0}
    assert runs[1].tags == {"method": "clip", "noise": 0.2, "seed": 0}
    assert runs[1].keys == {"noise": "data.caption_noise", "seed": "seed"}
    alpha = grid.product(grid.axis("alpha", [0.25, 1e-5], key="psd.alpha_max"))
    assert [r.name for r in alpha] == ["alpha=0.25", "alpha=1e-05"]
    assert grid.product(**{"psd.ramp": ["cosine"]})[0].overrides == {"psd.ramp": "cosine"}
    with pytest.raises(ValueError, match="plain values need a config key"):
        grid.product(width=[1, 2])
    with pytest.raises(KeyError, match="unknown levels"):
        grid.pick(METHODS, "psd-oracle")


def test_names_are_filesystem_safe_and_unique():
    assert grid.run_name({"m": "a/b c", "x": 0.1}) == "m=a_b_c,x=0.1"
    assert grid.run_name({}) == "base"
    assert grid.format_value(0.1 + 0.2) == repr(0.1 + 0.2)   # exact, so different values get different names
    long_a, long_b = grid.run_name({"m": "x" * 300 + "a"}), grid.run_name({"m": "x" * 300 + "b"})
    assert len(long_a) <= 200 and long_a != long_b


def test_combine_removes_duplicates_and_merges_tags():
    full = grid.product(method=grid.pick(METHODS, "clip", "psd-ema"), noise=[0.0, 0.2, 0.5], seed=[0])
    teachers = grid.product(method=grid.pick(METHODS, "psd-ema", "psd-self"), noise=[0.5], seed=[0])
    fractions = grid.product(method=grid.pick(METHODS, "clip", "psd-ema"), noise=[0.5], fraction=[0.1, 0.3],
                             seed=[0])
    runs = grid.combine(full, teachers, fractions)
    assert len(runs) == 6 + 1 + 4
    assert len({r.name for r in runs}) == len(runs)
    with pytest.raises(ValueError, match="both named"):
        grid.combine(grid.product(method={"m": {"psd.alpha_max": 0.1}}),
                     grid.product(method={"m": {"psd.alpha_max": 0.2}}))
    # The same run under two labels is one run; the first name wins and tags merge.
    merged = grid.combine(grid.product(method={"a": {"seed": 1}}), grid.product(seed=[1]))
    assert len(merged) == 1 and merged[0].name == "method=a" and merged[0].tags == {"method": "a", "seed": 1}


def test_resolve_drops_defaults_and_checks_keys():
    base = base_config()
    runs = grid.combine(grid.product(method=grid.pick(METHODS, "psd-ema"), noise=[0.5], seed=[0]),
                        grid.product(method=grid.pick(METHODS, "psd-ema"), noise=[0.5], fraction=[0.1, 1.0],
                                     seed=[0]))
    assert len(runs) == 3                                  # fraction=1.0 and psd.teacher=ema are still overrides
    resolved = plan.resolve(runs, base)
    assert [r.name for r in resolved] == ["method=psd-ema,noise=0.5,seed=0",
                                          "method=psd-ema,noise=0.5,fraction=0.1,seed=0"]
    assert resolved[0].overrides == {"data.caption_noise": 0.5}   # ema is the default teacher, seed 0 the default
    values = plan.variables(resolved, base)
    assert values["method=psd-ema,noise=0.5,seed=0"] == {"method": "psd-ema", "noise": 0.5, "seed": 0,
                                                         "fraction": 1.0}
    with pytest.raises(plan.PlanError, match="run x=1: unknown config key 'psd.nope'"):
        plan.resolve(grid.product(grid.axis("x", [1], key="psd.nope")), base)
    with pytest.raises(plan.PlanError, match="group of keys"):
        plan.resolve(grid.product(grid.axis("x", [1], key="psd")), base)


def test_one_at_a_time_and_cross():
    runs = grid.one_at_a_time(alpha_max=grid.axis("alpha_max", [0.25, 0.5], key="psd.alpha_max"),
                              rho=grid.axis("rho", [0.5, 1.0], key="psd.subset_fraction"),
                              fixed=grid.product(seed=[0, 1]))
    resolved = plan.resolve(runs, base_config())          # alpha 0.5 and rho 0.5 are the defaults: the base run
    assert [r.name for r in resolved] == ["seed=0", "seed=1", "alpha_max=0.25,seed=0", "alpha_max=0.25,seed=1",
                                          "rho=1,seed=0", "rho=1,seed=1"]
    assert resolved[0].tags == {"seed": 0, "alpha_max": 0.5, "rho": 0.5}


def test_flags_steps_and_status(tmp_path):
    assert plan.flag_value(0.1) == "0.1" and plan.flag_value(True) == "True" and plan.flag_value((0.5, 1.0)) == \
        "(0.5, 1.0)"
    base = base_config()
    assert plan.expected_num_steps(base, {}, []) == base.num_steps
    assert plan.expected_num_steps(base, {"num_steps": 7}, ["--config.num_steps=9"]) == 9
    wd = str(tmp_path)
    assert plan.run_status(wd, 4) == "new"
    (tmp_path / "log.txt").write_text("x")
    assert plan.run_status(wd, 4) == "partial"
    (tmp_path / "done.json").write_text(json.dumps({"step": 4, "num_steps": 4}))
    assert plan.run_status(wd, 4) == "finished" and plan.run_status(wd, 8) == "stale"


FAKE_PYTHON = """#!/bin/sh
# Stands in for python: records its arguments, fails for noise=0.5 runs, else writes done.json.
for a in "$@"; do case "$a" in --workdir=*) W="${a#--workdir=}";; esac; done
echo "args: $*"
case "$W" in *noise=0.5*) echo "boom: this run fails"; exit 3;; esac
echo '{"step": 4, "num_steps": 4, "train": {"train/loss": 1.5}}' > "$W/done.json"
echo '{"step": 4, "results": {"heldout": {"i2t_R@1": 0.25}}}' > "$W/eval_results.json"
"""


def test_launcher_reports_failures_goes_on_and_reruns_only_those(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    root = str(tmp_path / "sweep")
    out = io.StringIO()
    status = launch.launch(TINY, root, parallel=2, extra=["--config.num_steps=4"], python=str(fake), out=out)
    text = out.getvalue()
    assert status == 1
    assert "FAILED with exit code 3" in text and "boom: this run fails" in text
    assert "sweep: 2 run(s) ok, 3 failed, 0 already finished" in text
    ok = os.path.join(root, "method=clip,noise=0,seed=0")
    attempts = json.load(open(os.path.join(ok, "launch.json")))["attempts"]
    assert len(attempts) == 1 and attempts[0]["returncode"] == 0
    assert "--config.num_steps=4" in open(os.path.join(ok, "log.txt")).read()
    sweep = json.load(open(os.path.join(root, "sweep.json")))
    assert sweep["variables"] == ["method", "noise", "seed", "fraction"] and len(sweep["runs"]) == 5
    out = io.StringIO()
    assert launch.launch(TINY, root, extra=["--config.num_steps=4"], python=str(fake), out=out) == 1
    assert "2 finished (skipped), 3 to run" in out.getvalue()
    out = io.StringIO()                                  # another num_steps: the finished runs are stale
    launch.launch(TINY, root, dry_run=True, extra=["--config.num_steps=8"], python=str(fake), out=out)
    assert "0 finished (skipped), 5 to run" in out.getvalue() and "[stale] method=clip,noise=0,seed=0" in out.getvalue()
    out = io.StringIO()
    assert launch.launch(TINY, root, print_commands=True, extra=["--config.num_steps=4"], out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("# ") and len(lines) == 4
    assert all("python -m softalign.main" in line and "noise=0.5" in line for line in lines[1:])


def test_markdown_table_and_plot_slice():
    rows = [dict(run=f"r{i}", status="finished", method=m, noise=n, fraction=f, seed=s, wall_seconds=60.0,
                 **{"heldout/i2t_R@1": v})
            for i, (m, n, f, s, v) in enumerate([("clip", 0.0, 1.0, 0, 0.10), ("clip", 0.0, 1.0, 1, 0.20),
                                                 ("clip", 0.5, 1.0, 0, 0.05), ("clip", 0.5, 0.1, 0, 0.01),
                                                 ("clip", 0.5, 0.3, 0, 0.02)])]
    table = aggregate.markdown_table(["method", "noise", "fraction", "seed"], rows, ["heldout/i2t_R@1"])
    lines = table.splitlines()
    assert lines[0] == "| method | noise | fraction | seeds | heldout/i2t_R@1 (%) | wall (min) |"
    assert lines[2] == "| clip | 0 | 1 | 2 | 15.0 ± 7.1 | 1.0 |"
    fixed, members = plots.grid_slice(rows, ["method", "noise", "fraction", "seed"], "fraction", "method", "seed")
    assert fixed == {"noise": 0.5} and len(members) == 3
    fixed, members = plots.grid_slice(rows, ["method", "noise", "fraction", "seed"], "noise", "method", "seed")
    assert fixed == {"fraction": 1.0} and len(members) == 3


def test_plot_of_equal_seed_values_whose_mean_rounds_past_them(tmp_path):
    # three seeds at 0.999: their mean in % is 1.4e-14 above the max, which matplotlib rejects as a negative bar
    rows = [dict(run=f"r{i}", status="finished", method="m", noise=n, seed=s, **{"color/top1": 0.999})
            for i, (n, s) in enumerate([(n, s) for n in (0.0, 0.5) for s in (0, 1, 2)])]
    path = plots.plot_vs(rows, ["method", "noise", "seed"], x="noise", series="method", metrics=["color/top1"],
                         path=str(tmp_path / "p.png"))
    assert path and os.path.getsize(path) > 1000


def _sweep(*args, root):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "softalign.sweep", *args, f"--root={root}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def _log_times(root):
    return {name: os.path.getmtime(os.path.join(root, name, "log.txt"))
            for name in os.listdir(root) if os.path.exists(os.path.join(root, name, "log.txt"))}


def test_tiny_sweep_end_to_end(tmp_path):
    """A killed sweep (here: one run launched alone), relaunched: only the missing runs run; then nothing does;
    then only a run that lost its done marker. The aggregate has a row per run and both plots."""
    root = str(tmp_path / "sweep")
    first = "method=clip,noise=0,seed=0"
    out = _sweep("launch", f"--sweep={TINY}", "--only=method=clip,noise=0,", root=root)
    assert "1 selected, 0 finished (skipped), 1 to run" in out and "1 run(s) ok, 0 failed" in out
    before = _log_times(root)
    out = _sweep("launch", f"--sweep={TINY}", "--parallel=2", root=root)
    assert "5 runs in the grid, 5 selected, 1 finished (skipped), 4 to run" in out
    assert "4 run(s) ok, 0 failed" in out
    after = _log_times(root)
    assert after[first] == before[first] and len(after) == 5
    out = _sweep("launch", f"--sweep={TINY}", "--parallel=2", root=root)
    assert "5 finished (skipped), 0 to run" in out and _log_times(root) == after
    lost = "method=psd-ema,noise=0.5,seed=0"
    os.remove(os.path.join(root, lost, "done.json"))
    out = _sweep("launch", f"--sweep={TINY}", root=root)
    assert "4 finished (skipped), 1 to run" in out and "[start] " + lost in out
    changed = {k for k, v in _log_times(root).items() if v != after[k]}
    assert changed == {lost}
    assert "Run complete (4/4 steps)" in open(os.path.join(root, lost, "log.txt")).read()
    assert json.load(open(os.path.join(root, lost, "done.json")))["step"] == 4

    out = _sweep("aggregate", root=root)
    assert "5 of 5 runs finished" in out and "| method | noise | fraction | seeds |" in out
    with open(os.path.join(root, "summary", "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5 and {r["status"] for r in rows} == {"finished"}
    for column in ("run", "method", "noise", "seed", "fraction", "wall_seconds", "train_loss", "heldout/i2t_R@1",
                   "heldout/t2i_R@5", "color/top1"):
        assert column in rows[0], column
    by_name = {r["run"]: r for r in rows}
    assert by_name["method=psd-ema,noise=0.5,fraction=0.5,seed=0"]["fraction"] == "0.5"
    assert by_name[first]["fraction"] == "1.0" and float(by_name[first]["train_loss"]) > 0
    assert all(0.0 <= float(r["heldout/i2t_R@1"]) <= 1.0 and float(r["wall_seconds"]) > 0 for r in rows)
    for name in ("metrics_vs_noise.png", "metrics_vs_fraction.png"):
        path = os.path.join(root, "summary", name)
        assert os.path.getsize(path) > 1000 and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(os.path.join(root, "summary", "results.md")) > 0
