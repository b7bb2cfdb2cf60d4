"""Robustness report: markdown + CSV table and a scatter PNG with the y = x line."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("matplotlib")

from softalign.evaluation.robustness import RobustnessPoint, robustness_report, robustness_table  # noqa: E402


def test_report_writes_table_csv_and_png(tmp_path):
    points = [("imagenet-v2", 0.70, 0.61), RobustnessPoint("imagenet-sketch", 0.70, 0.35),
              ("imagenet-r", 0.70, 0.77, "other model")]
    paths = robustness_report(points, str(tmp_path / "out"), model="ViT-B/16")
    assert sorted(paths) == ["csv", "md", "png"]

    md = open(paths["md"]).read()
    assert "| model | shifted dataset | in-distribution top-1 (%) |" in md
    assert "| ViT-B/16 | imagenet-v2 | 70.00 | 61.00 | 9.00 | 87.1 |" in md
    assert "| other model | imagenet-r | 70.00 | 77.00 | -7.00 | 110.0 |" in md

    rows = list(csv.DictReader(open(paths["csv"])))
    assert [r["shift"] for r in rows] == ["imagenet-v2", "imagenet-sketch", "imagenet-r"]
    assert rows[1]["shifted_top1"] == "35.00" and rows[1]["drop"] == "35.00" and rows[1]["relative"] == "50.0"

    with Image.open(paths["png"]) as png:
        assert png.format == "PNG" and png.size[0] > 300 and png.size[1] > 300
        pixels = np.asarray(png.convert("L"))
    assert pixels.std() > 5  # something was drawn


def test_table_and_bad_points():
    rows = robustness_table([("shift", 0.0, 0.0)])
    assert rows[0]["relative"] == "n/a"
    with pytest.raises(ValueError, match="fractions in \\[0, 1\\]"):
        robustness_table([("shift", 70.0, 61.0)])
    with pytest.raises(ValueError, match="at least one"):
        robustness_table([])
