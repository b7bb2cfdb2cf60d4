"""``python -m softalign.tools.wise_ft``: weight-space ensembles of two endpoints (WiSE-FT, Wortsman et al. 2022).

theta(alpha) = (1 - alpha) * theta_base + alpha * theta_run, for each mixing coefficient alpha, evaluated with the
run's evaluators (``config.evals``, plus ``--evals`` JSON as in ``softalign.evaluate``). The base (alpha = 0) is
another checkpoint of a workdir or imported weights (open_clip ``.safetensors``/``.pt`` or ``.msgpack``); the run
(alpha = 1) is ``--workdir``, whose config and tokenizer build the model and the evaluators. alpha = 0 and 1 are
the endpoints' parameters bit for bit. Writes ``wise_ft.md``, ``.csv`` (every metric), ``.json`` and ``.png``
(reference-set vs shifted-set accuracy, one point per alpha):

    python -m softalign.tools.wise_ft --workdir=/tmp/sa-demo --base=/tmp/sa-demo --base_step=100 \\
        --suite=robustness --reference=color --shifted=color_cluttered
"""

from __future__ import annotations

import csv
import json
import os
import sys
from typing import Any, Optional, Sequence

import jax
import numpy as np
from absl import app, flags

from softalign.api import Model, as_config, load
from softalign.tools.common import run_tool
from softalign.workdir import is_fraction

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined on first use, not at import)."""
    flags.DEFINE_string("workdir", None, "The run at alpha = 1 (its config.json, tokenizer and checkpoint).")
    flags.DEFINE_integer("step", None, "Checkpoint of --workdir (default: the latest).")
    flags.DEFINE_string("base", None, "alpha = 0: a workdir, or weights (.safetensors, .pt, .bin, .msgpack).")
    flags.DEFINE_integer("base_step", None, "Checkpoint of --base when it is a workdir (default: the latest).")
    flags.DEFINE_string("config", "", "Config file for --workdir when it has no config.json.")
    flags.DEFINE_list("alphas", ["0", "0.25", "0.5", "0.75", "1"], "Mixing coefficients (weight of --workdir).")
    flags.DEFINE_string("evals", "", "Extra evaluators as JSON {name: {kind, ...}} (see softalign.evaluate).")
    flags.DEFINE_string("suite", "", "Evaluate a named suite (softalign/evaluation/suites.py) instead of config.evals.")
    flags.DEFINE_list("only", [], "Run only these evaluators.")
    flags.DEFINE_string("reference", "", "NAME[:METRIC]: the reference (in-distribution) set for the plot.")
    flags.DEFINE_list("shifted", [], "NAME[:METRIC],...: shifted sets for the plot (their mean is plotted).")
    flags.DEFINE_string("output_dir", "", "Where to write wise_ft.* (default WORKDIR/wise_ft).")
    flags.mark_flags_as_required(["workdir", "base"])


def interpolate(base: Any, run: Any, alpha: float) -> Any:
    """(1 - alpha) * base + alpha * run, leaf by leaf in each leaf's dtype; alpha 0 / 1 return the endpoints."""
    alpha = float(alpha)
    if jax.tree.structure(base) != jax.tree.structure(run):
        raise ValueError("the endpoints' parameter trees differ (different architectures?)")
    bad = [jax.tree_util.keystr(p) for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(base),
                                                         jax.tree.leaves(run)) if a.shape != b.shape]
    if bad:
        raise ValueError(f"the endpoints' shapes differ at {bad[:5]}")
    if alpha == 0.0:
        return base
    if alpha == 1.0:
        return run
    return jax.tree.map(lambda a, b: ((1.0 - alpha) * a + alpha * b).astype(a.dtype), base, run)


def load_endpoints(workdir: str, base: str, *, step: Optional[int] = None, base_step: Optional[int] = None,
                   config: Any = None) -> tuple[Model, Any]:
    """(the run's Model, the base's params) -- the base rebuilt with the run's config and tokenizer."""
    run = load(workdir, step=step, config=config)
    if os.path.isdir(base):
        other = load(base, step=base_step, config=run.config)
    else:
        tokenizer = _tokenizer_path(run, workdir)
        other = load(base, config=run.config, tokenizer=tokenizer)
    return run, other.params


def _tokenizer_path(run: Model, workdir: str) -> Optional[str]:
    from softalign import workdir as run_files
    return run.config.tokenizer.path or os.path.join(workdir, run_files.TOKENIZER_FILE)


def _metric_of(spec: str, results: dict[str, dict[str, float]]) -> tuple[str, str]:
    name, _, metric = spec.partition(":")
    if name not in results:
        raise ValueError(f"{spec}: no evaluator {name!r}; known: {sorted(results)}")
    if not metric:
        fractions = [k for k in results[name] if is_fraction(k) and not k.startswith("recall[")]
        metric = "top1" if "top1" in results[name] else (fractions[0] if fractions else "")
    if metric not in results[name]:
        raise ValueError(f"{spec}: evaluator {name!r} has no metric {metric!r}; it has {sorted(results[name])}")
    return name, metric


def sweep(run: Model, base_params: Any, alphas: Sequence[float], evals: dict[str, Any]
          ) -> list[dict[str, Any]]:
    """``[{alpha, results: {eval: metrics}}]``: every evaluator (built once) on every interpolation."""
    from softalign.evaluation import suite

    evaluators = suite.build_evaluators(run.config, run.tokenizer, run.batch_sharding, evals=evals)
    rows = []
    for alpha in alphas:
        params = interpolate(base_params, run.params, alpha)
        enc_img, enc_txt = run.embedding_fns(params)
        results = {ev.name: ev.run(enc_img, enc_txt) for ev in evaluators}
        rows.append({"alpha": float(alpha), "results": results})
        print(f"alpha {alpha:g}: " + ", ".join(f"{n} {k} {100 * v:.1f}%" for n, m in sorted(results.items())
                                               for k, v in m.items() if k in ("top1", "i2t_R@1", "t2i_R@1")),
              flush=True)
    return rows


def write_report(rows: list[dict[str, Any]], output_dir: str, reference: str = "",
                 shifted: Sequence[str] = ()) -> dict[str, str]:
    """wise_ft.csv (alpha, eval, metric, value), .md (primary metric per evaluator), .json and, with a
    reference and shifted sets, .png. Returns the paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {ext: os.path.join(output_dir, f"wise_ft.{ext}") for ext in ("csv", "md", "json")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["alpha", "eval", "metric", "value"])
        for row in rows:
            for name, metrics in sorted(row["results"].items()):
                writer.writerows([row["alpha"], name, k, v] for k, v in metrics.items())
    first = rows[0]["results"]
    columns = [_metric_of(name, first) for name in sorted(first)]
    columns = [c for c in columns if c[1]]
    lines = ["| alpha | " + " | ".join(f"{n} {m}" for n, m in columns) + " |",
             "|---:|" + "---:|" * len(columns)]
    for row in rows:
        cells = [f"{100 * row['results'][n][m]:.2f}" if is_fraction(m) else f"{row['results'][n][m]:.2f}"
                 for n, m in columns]
        lines.append(f"| {row['alpha']:g} | " + " | ".join(cells) + " |")
    with open(paths["md"], "w") as f:
        f.write("# WiSE-FT: (1 - alpha) * base + alpha * run\n\n" + "\n".join(lines) + "\n")
    with open(paths["json"], "w") as f:
        json.dump(rows, f, indent=2, sort_keys=True)
    if reference and shifted:
        from softalign.tools.plots import path_plot

        ref = _metric_of(reference, first)
        shifts = [_metric_of(s, first) for s in shifted]
        x = [100 * r["results"][ref[0]][ref[1]] for r in rows]
        y = [100 * float(np.mean([r["results"][n][m] for n, m in shifts])) for r in rows]
        paths["png"] = os.path.join(output_dir, "wise_ft.png")
        label = ", ".join(f"{n} {m}" for n, m in shifts)
        path_plot(paths["png"], x, y, [f"α={r['alpha']:g}" for r in rows], xlabel=f"{ref[0]} {ref[1]} (%)",
                  ylabel=f"{'mean of ' if len(shifts) > 1 else ''}{label} (%)", title="WiSE-FT interpolation")
    return paths


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from softalign.evaluation.suites import select_evals

    try:
        alphas = [float(a) for a in FLAGS.alphas]
        run, base_params = load_endpoints(FLAGS.workdir, FLAGS.base, step=FLAGS.step, base_step=FLAGS.base_step,
                                          config=as_config(FLAGS.config) if FLAGS.config else None)
        extra = json.loads(FLAGS.evals) if FLAGS.evals else {}
        if FLAGS.suite:
            from softalign.evaluation.suites import suite_evals
            extra = {**suite_evals(FLAGS.suite), **extra}
            run.config.evals = {}
        evals = select_evals(run.config, extra=extra, only=FLAGS.only)
        rows = sweep(run, base_params, alphas, evals)
        paths = write_report(rows, FLAGS.output_dir or os.path.join(FLAGS.workdir, "wise_ft"), FLAGS.reference,
                             FLAGS.shifted)
    except (ValueError, OSError) as e:
        print(f"softalign: {e}", file=sys.stderr)
        sys.exit(2)
    with open(paths["md"]) as f:
        print(f.read())
    print("Wrote " + ", ".join(paths[k] for k in sorted(paths)))


def run() -> None:
    run_tool(main, define_flags)


if __name__ == "__main__":
    run()
