"""What the tool commands share: lazy flag definition (so the tool modules import side by side, e.g. in tests) and
the choice of evaluators, without importing `softalign.cli.evaluate` (whose flags would clash with theirs)."""

from __future__ import annotations

from typing import Any, Callable, Optional


def run_tool(main: Callable[[list[str]], None], define_flags: Callable[[], None]) -> None:
    """Defines the tool's flags, then runs ``main`` as an absl app with one-line flag errors."""
    from absl import app

    from softalign.cli import common

    define_flags()
    app.run(main, flags_parser=common.parse_flags)


def select_evals(config: Any, extra: Optional[dict[str, Any]] = None, only: Optional[list[str]] = None
                 ) -> dict[str, Any]:
    """``config.evals`` updated with `extra` (name -> options), restricted to `only`; ValueError when none is left
    or `only` names an unknown one."""
    evals = dict(config.evals.to_dict())
    evals.update(extra or {})
    if only:
        unknown = sorted(set(only) - set(evals))
        if unknown:
            raise ValueError(f"--only names unknown evaluators {unknown}; known: {sorted(evals)}")
        evals = {k: v for k, v in evals.items() if k in only}
    if not evals:
        raise ValueError("no evaluators to run (config.evals is empty and no extra ones were given)")
    return evals
