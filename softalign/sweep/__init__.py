"""Sweeps: grids of runs (grid.py), a launcher that runs and resumes them (launch.py) and an aggregator that
tabulates and plots their results (aggregate.py, plots.py). CLI: ``python -m softalign.sweep launch|aggregate``;
see docs/sweeps.md."""

from softalign.sweep.grid import (
           KNOWN_AXES,
           Axis,
           Level,
           Run,
           axis,
           combine,
           cross,
           dedupe,
           one_at_a_time,
           pick,
           product,
           run_name,
)

__all__ = ["KNOWN_AXES", "Axis", "Level", "Run", "axis", "combine", "cross", "dedupe", "one_at_a_time", "pick",
           "product", "run_name"]
