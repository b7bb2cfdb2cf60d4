"""``python -m softalign.evaluate`` on a tiny trained run: table on stdout, eval_results.json, extra evaluators from
flags (JSON, image folder with a corrupt JPEG, linear probe), --step, --only, a robustness report, clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "tiny_config.py")


def _run(module, *args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    cmd = [sys.executable, "-m", module, f"--config={TINY}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run") / "w")
    r = _run("softalign.main", f"--workdir={workdir}", "--config.num_steps=8", "--config.checkpoint_every=4")
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir


def _folder(root):
    for cls, colour in (("red", (230, 20, 20)), ("blue", (20, 20, 230))):
        os.makedirs(os.path.join(root, cls))
        for i in range(3):
            Image.new("RGB", (12, 10), colour).save(os.path.join(root, cls, f"{i}.jpg"))
    with open(os.path.join(root, "red", "broken.jpg"), "wb") as f:
        f.write(b"not a jpeg")


def test_evaluate_cli_prints_table_and_writes_results(trained, tmp_path):
    _folder(str(tmp_path / "colours"))
    probe_spec = lambda split: dict(type="synthetic", split=split, num_examples=48, attribute="color")
    extra = {"colours": dict(kind="zeroshot", dataset=dict(type="folder", path=str(tmp_path / "colours")),
                             templates=["a {} thing"]),
             "probe": dict(kind="linear_probe", train=probe_spec("train"), test=probe_spec("heldout"),
                           l2_grid=[1e-2, 1e2, 3], refine_steps=0)}
    r = _run("softalign.evaluate", f"--workdir={trained}", f"--evals={json.dumps(extra)}",
             "--robustness=color:colours")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert f"Evaluating {trained}/checkpoints/8/state (step 8)" in out
    header = next(line for line in out.splitlines() if line.startswith("eval "))
    assert header.split() == ["eval", "metric", "value", "chance"]
    for row in ("heldout       i2t_R@1", "color ", "colours       skipped_images", "probe         top1"):
        assert any(line.startswith(row.split()[0]) and row.split()[-1] in line for line in out.splitlines()), row
    assert "s per 1,000 images" in out and "unreadable" in r.stderr

    results = json.load(open(os.path.join(trained, "eval_results.json")))
    assert results["step"] == 8
    assert set(results["results"]) == {"heldout", "color", "shape", "colours", "probe"}
    assert results["results"]["colours"]["skipped_images"] == 1
    assert 0.0 <= results["results"]["probe"]["top1"] <= 1.0 and "log10_l2" in results["results"]["probe"]
    assert results["chance"]["colours"]["top1"] == 0.5
    assert results["timing"]["colours"]["images"] == 7
    for ext in ("md", "csv", "png"):
        assert os.path.exists(os.path.join(trained, f"robustness.{ext}"))


def test_evaluate_cli_step_only_and_errors(trained, tmp_path):
    r = _run("softalign.evaluate", f"--workdir={trained}", "--step=4", "--only=heldout",
             f"--output={tmp_path / 'r.json'}", "--noprogress")
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.load(open(tmp_path / "r.json"))
    assert results["step"] == 4 and list(results["results"]) == ["heldout"]

    r = _run("softalign.evaluate", f"--workdir={trained}", "--step=5")
    assert r.returncode == 2 and "no checkpoint of step 5" in r.stderr and "saved steps: [4, 8]" in r.stderr
    r = _run("softalign.evaluate", f"--workdir={trained}", "--only=nope")
    assert r.returncode == 2 and "--only names unknown evaluators ['nope']" in r.stderr
    r = _run("softalign.evaluate", f"--workdir={tmp_path / 'empty'}")
    assert r.returncode == 2 and "no tokenizer" in r.stderr and "Traceback" not in r.stderr
    bad = json.dumps({"x": {"kind": "zeroshot", "dataset": {"type": "folder", "path": "/no/such"}}})
    r = _run("softalign.evaluate", f"--workdir={trained}", f"--evals={bad}")
    assert r.returncode == 2 and "config error: evals.x.dataset.path='/no/such'" in r.stderr
