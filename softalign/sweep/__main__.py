"""``python -m softalign.sweep launch|aggregate|curves``: run a grid of experiments, then tabulate and plot it.

    python -m softalign.sweep launch --sweep=configs/sweeps/synthetic_tiny.py --root=/tmp/sw --parallel=2 \\
        [--dry_run] [--print_commands] [--only=SUBSTRING ...] [--seeds=0,1,2] [--arg=KEY=VALUE ...] \\
        [-- --config.key=value ...]
    python -m softalign.sweep aggregate --root=/tmp/sw [--out=/tmp/sw/summary] [--metrics='*/i2t_R@1,*/top1']
    python -m softalign.sweep curves --root=/tmp/sw --metric=heldout/i2t_R@5 --baseline=scratch [--targets=final,0.3]

Everything after ``--`` is passed to every run's ``python -m softalign.main`` (e.g. data paths).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence
from typing import Any

from softalign.sweep import aggregate, curves, launch, plan


def _literal(text: str) -> Any:
    """A --arg value as a Python literal when it parses as one (numbers, tuples), else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def sweep_args(seeds: str, pairs: Sequence[str]) -> dict[str, Any]:
    """The keyword arguments for the sweep file's get_sweep(): ``--seeds=0,1`` and ``--arg=key=value`` pairs
    (values read as Python literals when they parse, else as strings)."""
    args: dict[str, Any] = {}
    if seeds:
        args["seeds"] = tuple(int(s) for s in seeds.split(",") if s.strip())
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise plan.PlanError(f"--arg={pair}: expected KEY=VALUE")
        args[key] = _literal(value)
    return args


def parser() -> argparse.ArgumentParser:
    """The CLI's argument parser (subcommands ``launch``, ``aggregate`` and ``curves``)."""
    p = argparse.ArgumentParser(prog="python -m softalign.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    lp = sub.add_parser("launch", help="run every unfinished run of a sweep file's grid")
    lp.add_argument("--sweep", required=True, help="the sweep file (get_config() and get_sweep())")
    lp.add_argument("--root", required=True, help="the sweep's folder: ROOT/<run name> per run, ROOT/sweep.json")
    lp.add_argument("--parallel", type=int, default=1, help="runs at a time on this machine")
    lp.add_argument("--dry_run", action="store_true", help="list the runs and their status; run and write nothing")
    lp.add_argument("--print_commands", action="store_true",
                    help="print one shell command per unfinished run (e.g. for a cluster) instead of running them")
    lp.add_argument("--only", action="append", default=[], help="only runs whose name contains this (repeatable)")
    lp.add_argument("--seeds", default="", help="comma-separated seeds, passed to get_sweep(seeds=...)")
    lp.add_argument("--arg", action="append", default=[], help="KEY=VALUE passed to get_sweep(KEY=VALUE)")
    lp.add_argument("--compilation_cache", default=None,
                    help="JAX persistent compilation cache shared by the runs (default ROOT/jax_cache; '' for none)")
    ap = sub.add_parser("aggregate", help="CSV, markdown table and plots of a sweep's results")
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", default="", help="output folder (default ROOT/summary)")
    ap.add_argument("--metrics", default=",".join(aggregate.DEFAULT_METRICS),
                    help="comma-separated metric columns or patterns (<eval>/<metric>, fnmatch) for the table/plots")
    ap.add_argument("--x", default="noise,fraction", help="variables to plot the metrics against")
    ap.add_argument("--series", default="method", help="the variable drawn as one line each")
    ap.add_argument("--seed_var", default="seed", help="the variable averaged over")
    cp = sub.add_parser("curves", help="a metric against steps (periodic evals) and the speed-up at equal score")
    cp.add_argument("--root", required=True)
    cp.add_argument("--out", default="", help="output folder (default ROOT/summary)")
    cp.add_argument("--metric", default="heldout/i2t_R@5", help="<eval>/<metric> of an evaluation with every > 0")
    cp.add_argument("--baseline", required=True, help="the series value the speed-ups are measured against")
    cp.add_argument("--targets", default="final",
                    help="comma-separated scores to reach (fractions for recalls/accuracies); 'final': the "
                         "baseline's final score at each seed")
    cp.add_argument("--series", default="method", help="the variable drawn as one line each")
    cp.add_argument("--seed_var", default="seed", help="the variable that pairs runs with the baseline")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = parser().parse_args(argv)
    try:
        if args.command == "launch":
            return launch.launch(args.sweep, args.root, parallel=args.parallel, dry_run=args.dry_run,
                                 print_commands=args.print_commands, only=args.only, extra=extra,
                                 args=sweep_args(args.seeds, args.arg), compilation_cache=args.compilation_cache)
        if extra:
            raise plan.PlanError(f"{args.command} takes no arguments after --: {extra}")
        if args.command == "curves":
            targets = [None if t.strip() == "final" else float(t) for t in args.targets.split(",") if t.strip()]
            report = curves.curves_report(args.root, args.metric, args.baseline, args.out, args.series, args.seed_var,
                                          targets)
            print(report["table"])
            print(f"\nWrote {report['md']}, {report['png']}")
            return 0
        result = aggregate.aggregate(args.root, args.out, [m for m in args.metrics.split(",") if m],
                                     [x for x in args.x.split(",") if x], args.series, args.seed_var)
    except plan.PlanError as e:
        print(f"softalign.sweep: {e}", file=sys.stderr)
        return 2
    print(result["table"])
    print(f"\n{result['finished']} of {result['runs']} runs finished. Wrote {result['csv']}, {result['md']}"
          + "".join(f", {p}" for p in result["pngs"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
