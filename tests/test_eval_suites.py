"""Evaluation suites: their definitions, and ``softalign.evaluate --suite --workdirs`` writing one JSON record per
(run, step, dataset, task, metric) that pandas loads."""

from __future__ import annotations

import json
import os

import pytest
from trained_run import run_module, train_tiny

from softalign.evaluation import suites


def test_suite_definitions():
    assert set(suites.SUITES) >= {"retrieval", "zeroshot", "robustness", "synthetic"}
    assert set(suites.suite_evals("synthetic")) == {"heldout", "color", "shape", "size", "position"}
    assert set(suites.suite_evals("retrieval")) == {"heldout"}
    assert "flickr8k_val" in suites.suite_evals("retrieval", flickr8k_dir="/data/f8k")
    assert "cifar10" in suites.suite_evals("zeroshot", cifar10_dir="/data/c10")
    robust = suites.suite_evals("robustness")
    assert suites.robustness_pairs("robustness", robust) == ["color:color_cluttered", "shape:shape_cluttered"]
    assert robust["color_cluttered"]["dataset"]["single_object"] is False
    with pytest.raises(ValueError, match="known suites: retrieval, robustness, synthetic, zeroshot"):
        suites.suite_evals("nope")
    assert suites.describe("heldout", {"kind": "retrieval", "split": "heldout"}) == ("retrieval", "heldout")
    assert suites.describe("c", {"kind": "synthetic_zeroshot", "attribute": "shape"}) == ("zeroshot",
                                                                                         "synthetic_shape")
    assert suites.describe("x", suites.suite_evals("zeroshot", cifar10_dir="/d")["cifar10"]) == ("zeroshot",
                                                                                                 "cifar10")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("suites")
    return [train_tiny(str(root / name), "--config.num_steps=2", f"--config.seed={seed}")
            for name, seed in (("a", 0), ("b", 1))]


def test_suite_over_several_runs_writes_metric_records(runs):
    r = run_module("softalign.evaluate", "--suite=synthetic", f"--workdirs={','.join(runs)}", "--noprogress",
                   config=False)
    assert r.returncode == 0, r.stderr[-3000:]
    path = os.path.join(os.path.dirname(runs[0]), "eval_records.jsonl")
    records = [json.loads(line) for line in open(path)]
    assert f"Wrote {len(records)} metric records of 2 run(s) to {path}" in r.stdout
    keys = {"run", "workdir", "step", "suite", "eval", "dataset", "task", "metric", "value", "chance"}
    assert all(set(rec) == keys for rec in records)
    assert {rec["run"] for rec in records} == {"a", "b"} and {rec["step"] for rec in records} == {2}
    for workdir, run in zip(runs, ("a", "b")):
        results = json.load(open(os.path.join(workdir, "eval_results.json")))["results"]
        mine = {(rec["eval"], rec["metric"]): rec["value"] for rec in records if rec["run"] == run}
        assert mine == {(name, k): v for name, m in results.items() for k, v in m.items()}
    tasks = {(rec["eval"], rec["task"], rec["dataset"]) for rec in records}
    assert ("heldout", "retrieval", "heldout") in tasks and ("shape", "zeroshot", "synthetic_shape") in tasks
    pd = pytest.importorskip("pandas", reason="pandas is optional; the records are plain JSON lines")
    frame = pd.read_json(path, lines=True)
    assert len(frame) == len(records) and set(frame.columns) == keys
    assert frame.groupby("run")["value"].count().to_dict() == {"a": len(records) // 2, "b": len(records) // 2}


def test_robustness_suite_and_errors(runs, tmp_path):
    out = tmp_path / "records.jsonl"
    r = run_module("softalign.evaluate", "--suite=robustness", f"--workdir={runs[0]}", f"--records={out}",
                   "--noprogress", config=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Robustness report" in r.stdout and os.path.exists(os.path.join(runs[0], "robustness.md"))
    assert {json.loads(line)["eval"] for line in open(out)} == {"color", "color_cluttered", "shape",
                                                                "shape_cluttered"}
    r = run_module("softalign.evaluate", "--suite=nope", f"--workdir={runs[0]}", config=False)
    assert r.returncode == 2 and "unknown suite 'nope'" in r.stderr and "Traceback" not in r.stderr
    r = run_module("softalign.evaluate", config=False)
    assert r.returncode == 2 and "give --workdir" in r.stderr
