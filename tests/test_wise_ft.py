"""WiSE-FT: interpolation endpoints are the endpoints' params bit for bit; the CLI evaluates every coefficient
and alpha = 1 reproduces the run's own final evaluation."""

from __future__ import annotations

import csv
import json
import os

import jax
import numpy as np
import pytest
from trained_run import run_module, train_tiny

from softalign.interop import weight_files
from softalign.tools import wise_ft


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(str(tmp_path_factory.mktemp("wise") / "w"))


def _bits(tree):
    return [np.asarray(x).view(np.uint32) for x in jax.tree.leaves(tree)]


def test_endpoints_are_bit_exact_and_the_middle_is_the_mean(run):
    model, base = wise_ft.load_endpoints(run, run, base_step=2)
    for alpha, expected in ((0.0, base), (1.0, model.params)):
        for x, y in zip(_bits(wise_ft.interpolate(base, model.params, alpha)), _bits(expected)):
            np.testing.assert_array_equal(x, y)
    half = wise_ft.interpolate(base, model.params, 0.5)
    for h, a, b in zip(jax.tree.leaves(half), jax.tree.leaves(base), jax.tree.leaves(model.params)):
        np.testing.assert_allclose(np.asarray(h), (np.asarray(a, np.float64) + np.asarray(b)) / 2, rtol=1e-6,
                                   atol=1e-7)
    assert any(not np.array_equal(a, b) for a, b in zip(_bits(base), _bits(model.params)))
    bad = jax.tree.map(lambda x: x[..., :1] if x.ndim else x, base)
    with pytest.raises(ValueError, match="shapes differ"):
        wise_ft.interpolate(bad, model.params, 0.5)


def test_weight_file_base_equals_the_checkpoint(run, tmp_path):
    model, base = wise_ft.load_endpoints(run, run, base_step=2)
    path = str(tmp_path / "base.msgpack")
    weight_files.save_params(base, path)
    _, from_file = wise_ft.load_endpoints(run, path)
    for x, y in zip(_bits(from_file), _bits(base)):
        np.testing.assert_array_equal(x, y)


def test_cli_table_plot_and_alpha_one_is_the_run(run, tmp_path):
    out = tmp_path / "wise"
    r = run_module("softalign.tools.wise_ft", f"--workdir={run}", f"--base={run}", "--base_step=2",
                   "--alphas=0,0.5,1", "--reference=color", "--shifted=shape,heldout:i2t_R@5",
                   f"--output_dir={out}", config=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| alpha |" in r.stdout and "color top1" in r.stdout
    rows = json.load(open(out / "wise_ft.json"))
    assert [row["alpha"] for row in rows] == [0.0, 0.5, 1.0]
    final = json.load(open(os.path.join(run, "eval_results.json")))["results"]
    assert rows[-1]["results"] == final          # alpha = 1 is the run itself, evaluated the same way
    table = list(csv.DictReader(open(out / "wise_ft.csv")))
    assert {row["eval"] for row in table} == {"color", "heldout", "shape"} and len({row["alpha"] for row in table}) == 3
    assert os.path.getsize(out / "wise_ft.png") > 1000
    r = run_module("softalign.tools.wise_ft", f"--workdir={run}", f"--base={tmp_path / 'none.safetensors'}",
                   config=False)
    assert r.returncode == 2 and "neither a training run's workdir nor a weight file" in r.stderr
