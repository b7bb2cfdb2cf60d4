"""What the tool commands share: lazy flag definition (so the tool modules import side by side, e.g. in tests) and
one-line flag errors (the choice of evaluators is `softalign.evaluation.suites.select_evals`)."""

from __future__ import annotations

from typing import Callable


def run_tool(main: Callable[[list[str]], None], define_flags: Callable[[], None]) -> None:
    """Defines the tool's flags, then runs ``main`` as an absl app with one-line flag errors."""
    from absl import app

    from softalign.cli import common

    define_flags()
    app.run(main, flags_parser=common.parse_flags)


