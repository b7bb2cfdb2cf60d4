"""Standalone evaluation of a checkpoint: ``python -m softalign.evaluate --config=... --workdir=... [--step=N]``.

Restores only the parameters of the latest (or ``--step``) checkpoint in ``WORKDIR/checkpoints`` (an Orbax partial
restore: no optimizer or teacher state is read), rebuilds the model with the run's tokenizer (``WORKDIR/tokenizer.json``
or ``config.tokenizer.path``), runs every evaluator of ``config.evals`` plus any added by flags, prints a table and
writes ``WORKDIR/eval_results.json``. For example (the shared CIFAR-10 test folder and Flickr8k val split):

    python -m softalign.evaluate --config=configs/demo.py --workdir=/tmp/sa-demo \\
        --cifar10_dir=../shared/data/cifar10/test --flickr8k_dir=../shared/data/flickr8k

Any config key can be overridden with ``--config.key=value`` as for training (e.g. ``--config.eval_batch_size=512``).
Without ``--config`` the run's own ``WORKDIR/config.json`` (written by training) is used.

Suites and several runs: ``--suite=NAME`` runs one of the named collections of `softalign.evaluation.suites`
(instead of config.evals) and ``--workdirs=A,B,...`` evaluates each run in turn; every metric also goes to a
results file of one JSON record per (run, step, dataset, task, metric) (``--records``, default
``eval_records.jsonl`` in the run, or in the runs' common parent), which ``pandas.read_json(path, lines=True)``
loads:

    python -m softalign.evaluate --suite=synthetic --workdirs=/tmp/sa-demo,/tmp/sa-clip
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Any, Callable, Optional

from absl import app, flags, logging
from ml_collections import config_flags

from softalign.cli import common

flags.DEFINE_string("workdir", None, "The training run's directory (checkpoints/, tokenizer.json).")
flags.DEFINE_list("workdirs", [], "Several runs to evaluate in turn (instead of --workdir).")
config_flags.DEFINE_config_file("config", None, "The run's config file (configs/*.py); default: each run's "
                                "config.json.", lock_config=True)
flags.DEFINE_string("suite", "", "A named suite of evaluators (softalign/evaluation/suites.py) instead of "
                    "config.evals: synthetic, retrieval, zeroshot, robustness.")
flags.DEFINE_string("records", "", "The results file of one JSON record per metric (default: eval_records.jsonl "
                    "in the run, or in the runs' common parent directory).")
flags.DEFINE_integer("step", None, "Checkpoint step to evaluate (default: the latest).")
flags.DEFINE_list("only", [], "Run only these evaluators (names), e.g. --only=heldout,cifar10.")
flags.DEFINE_bool("config_evals", True, "Run the evaluators of config.evals (--noconfig_evals: only the extra ones).")
flags.DEFINE_string("evals", "", "Extra evaluators as a JSON object {name: {kind, dataset, ...}} (see "
                    "docs/evaluation.md); a name already in config.evals is replaced.")
flags.DEFINE_string("cifar10_dir", "", "Adds 'cifar10': zero-shot on an image folder <dir>/<class>/*.jpg.")
flags.DEFINE_string("flickr8k_dir", "", "Adds 'flickr8k_<split>': retrieval on <dir>/images, captions.txt, "
                    "splits.json.")
flags.DEFINE_string("flickr8k_split", "val", "The splits.json split for --flickr8k_dir.")
flags.DEFINE_integer("max_examples", 0, "Random subset size (images) for the --cifar10_dir/--flickr8k_dir sets; "
                     "0: all.")
flags.DEFINE_list("robustness", [], "ID:SHIFT pairs of evaluator names (top1 of each) for a robustness report "
                  "(WORKDIR/robustness.md, .csv, .png), e.g. --robustness=imagenet:imagenet_v2.")
flags.DEFINE_string("output", "", "Where to write the results json (default WORKDIR/eval_results.json).")
flags.DEFINE_bool("progress", True, "Progress bars on stderr for embedding passes.")
FLAGS = flags.FLAGS


class EvaluateError(RuntimeError):
    """Nothing to evaluate (no checkpoint, no tokenizer); the message says what is missing."""


def shortcut_evals(cifar10_dir: str = "", flickr8k_dir: str = "", flickr8k_split: str = "val",
                   max_examples: int = 0) -> dict[str, dict[str, Any]]:
    """The evaluators that --cifar10_dir / --flickr8k_dir add."""
    limit = max_examples if max_examples and max_examples > 0 else None
    evals: dict[str, dict[str, Any]] = {}
    if cifar10_dir:
        evals["cifar10"] = dict(kind="zeroshot", dataset=dict(type="folder", path=cifar10_dir, name="cifar10",
                                                              max_examples=limit))
    if flickr8k_dir:
        evals[f"flickr8k_{flickr8k_split}"] = dict(kind="retrieval", dataset=dict(
            type="captions", path=flickr8k_dir, split=flickr8k_split, name=f"flickr8k-{flickr8k_split}",
            max_examples=limit))
    return evals


def select_evals(config: Any, *, extra: Optional[dict[str, Any]] = None, only: Optional[list[str]] = None,
                 include_config: bool = True) -> dict[str, Any]:
    """config.evals (unless not `include_config`) updated with `extra`, restricted to `only` when given."""
    from softalign.evaluation import suites

    try:
        return suites.select_evals(config, extra, only, include_config)
    except ValueError as e:
        raise EvaluateError(str(e)) from None


def progress_bar(label: str) -> Callable[[int, int], None]:
    """A progress callback for one embedding pass: a tqdm bar on a terminal, else a line per ~10% on stderr."""
    if not sys.stderr.isatty():
        last = [-1]

        def log(done: int, total: int) -> None:
            tenth = 10 * done // max(total, 1)
            if tenth > last[0]:
                last[0] = tenth
                print(f"  {label}: {done}/{total}", file=sys.stderr, flush=True)

        return log
    from tqdm import tqdm
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=label, file=sys.stderr, leave=False, mininterval=0.5, dynamic_ncols=True)
        bar.update(max(0, min(done, total) - bar.n))
        if done >= total:
            bar.close()

    return update


def results_table(results: dict[str, dict[str, float]], chances: dict[str, dict[str, float]]) -> str:
    """Aligned text table: evaluator, metric, value, chance."""
    from softalign.evaluation.suite import format_metric
    from softalign.workdir import is_fraction

    rows = [("eval", "metric", "value", "chance")]
    for name, metrics in results.items():
        for key, value in metrics.items():
            chance = chances.get(name, {}).get(key)
            shown = format_metric(key, value)
            rows.append((name, key, shown, f"{100 * chance:.1f}%" if chance is not None and is_fraction(key) else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def evaluate_checkpoint(config: Any, workdir: str, *, step: Optional[int] = None,
                        extra: Optional[dict[str, Any]] = None, only: Optional[list[str]] = None,
                        include_config: bool = True, progress: bool = False, output: str = "",
                        robustness: Optional[list[str]] = None) -> dict[str, Any]:
    """Runs the selected evaluators on one checkpoint; prints the table and writes the results json."""
    import jax

    from softalign import workdir as run_files
    from softalign.evaluation import suite
    from softalign.models import example_inputs
    from softalign.parallel import sharding
    from softalign.training import checkpointing, setup

    evals = select_evals(config, extra=extra, only=only, include_config=include_config)
    pairs = [_pair(p, evals) for p in (robustness or [])]
    loaded = setup.load_model(config, workdir)
    config, tokenizer, mesh = loaded.config, loaded.tokenizer, loaded.mesh
    params, step, path = checkpointing.restore_params(workdir, loaded.abstract_params, step)
    print(f"Evaluating {path} (step {step}) on {len(evals)} evaluator(s): {', '.join(sorted(evals))}", flush=True)

    encode_image, encode_text = setup.encoders(loaded.model)
    enc_img = functools.partial(encode_image, params)
    enc_txt = functools.partial(encode_text, params)
    batch = int(config.eval_batch_size)
    batch_sharding = sharding.batch_sharding(mesh)
    start = time.perf_counter()  # Compile both towers once up front, so the timings below are steady-state.
    images, texts = example_inputs(config.model, batch)  # tokens, or a precomputed-text model's embeddings
    jax.block_until_ready(enc_img(jax.device_put(images, batch_sharding)))
    jax.block_until_ready(enc_txt(jax.device_put(texts, batch_sharding)))
    compile_s = time.perf_counter() - start

    results: dict[str, dict[str, float]] = {}
    chances: dict[str, dict[str, float]] = {}
    timing: dict[str, dict[str, float]] = {"compile": {"seconds": compile_s}}
    factory = progress_bar if progress else None
    for name in sorted(evals):
        start = time.perf_counter()
        (evaluator,) = suite.build_evaluators(config, tokenizer, batch_sharding, evals={name: evals[name]},
                                              progress=factory)
        loaded = time.perf_counter()
        results[name] = evaluator.run(enc_img, enc_txt)
        done = time.perf_counter()
        chances[name] = evaluator.chance
        seconds = done - loaded
        timing[name] = {"load_seconds": loaded - start, "eval_seconds": seconds, "images": evaluator.num_images,
                        "eval_seconds_per_1000_images": 1000 * seconds / max(evaluator.num_images, 1)}
        logging.info("%s: %d images, loaded in %.1f s, evaluated in %.1f s", name, evaluator.num_images,
                     loaded - start, seconds)

    print(results_table(results, chances))
    print("timing (this machine, after compilation):")
    for name in sorted(evals):
        t = timing[name]
        print(f"  {name}: {t['images']} images, data {t['load_seconds']:.1f} s, eval {t['eval_seconds']:.1f} s "
              f"({t['eval_seconds_per_1000_images']:.2f} s per 1,000 images)")
    payload = {"step": step, "checkpoint": path, "results": results, "chance": chances, "timing": timing}
    if pairs:
        from softalign.evaluation.robustness import robustness_report
        points = [(shift, results[ident]["top1"], results[shift]["top1"]) for ident, shift in pairs]
        payload["robustness"] = robustness_report(points, workdir, model=os.path.basename(os.path.normpath(workdir)))
        print(f"Robustness report: {payload['robustness']['md']}")
    output = output or os.path.join(workdir, run_files.RESULTS_FILE)
    if jax.process_index() == 0:
        with open(output, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True)
    print(f"Wrote {output}", flush=True)
    return payload


def _pair(text: str, evals: dict[str, Any]) -> tuple[str, str]:
    parts = text.split(":")
    if len(parts) != 2 or not all(parts):
        raise EvaluateError(f"--robustness entries are ID:SHIFT evaluator names, got {text!r}")
    unknown = [p for p in parts if p not in evals]
    if unknown:
        raise EvaluateError(f"--robustness={text}: unknown evaluator(s) {unknown}; known: {sorted(evals)}")
    return parts[0], parts[1]


def run_config(workdir: str, config: Any = None) -> Any:
    """`config`, else the run's ``config.json`` laid over the schema's defaults (EvaluateError when neither)."""
    if config is not None:
        return config
    from softalign import workdir as run_files
    from softalign.config.schema import base_config

    saved = run_files.read_json(os.path.join(workdir, run_files.CONFIG_FILE))
    if not isinstance(saved, dict):
        raise EvaluateError(f"no --config and no readable {os.path.join(workdir, run_files.CONFIG_FILE)} "
                            "(is --workdir a training run's directory?)")
    merged = base_config()
    merged.update(saved)
    if isinstance(saved.get("evals"), dict):  # the run's own evaluators, not those plus the schema's defaults
        merged.evals = type(merged.evals)(saved["evals"])
    return merged


def metric_records(payload: dict[str, Any], evals: dict[str, Any], run: str, workdir: str, suite: str = ""
                   ) -> list[dict[str, Any]]:
    """One record per (run, step, dataset, task, metric) of an evaluation's payload."""
    from softalign.evaluation.suites import describe

    records = []
    for name, metrics in sorted(payload["results"].items()):
        task, dataset = describe(name, evals[name])
        for metric, value in metrics.items():
            records.append({"run": run, "workdir": os.path.abspath(workdir), "step": payload["step"],
                            "suite": suite, "eval": name, "dataset": dataset, "task": task, "metric": metric,
                            "value": float(value), "chance": payload["chance"].get(name, {}).get(metric)})
    return records


def write_records(path: str, records: list[dict[str, Any]]) -> None:
    """JSON lines, staged and renamed into place."""
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)
    os.replace(path + ".tmp", path)


def evaluate_runs(workdirs: list[str], *, config: Any = None, suite: str = "", extra: Optional[dict[str, Any]] = None,
                  suite_dirs: Optional[dict[str, Any]] = None, records_path: str = "", include_config: bool = True,
                  robustness: Optional[list[str]] = None, only: Optional[list[str]] = None, **options: Any
                  ) -> list[dict[str, Any]]:
    """`evaluate_checkpoint` on each run (its own config.json unless `config`), with suite `suite` replacing
    config.evals when given; writes and returns the metric records."""
    import jax

    from softalign.evaluation import suites

    labels = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    if len(set(labels)) < len(labels):
        labels = [os.path.abspath(w) for w in workdirs]
    extra, robustness = dict(extra or {}), list(robustness or [])
    if suite:
        try:
            suite_set = suites.suite_evals(suite, **(suite_dirs or {}))
        except ValueError as e:
            raise EvaluateError(str(e)) from None
        extra, include_config = {**suite_set, **extra}, False
        robustness = robustness or suites.robustness_pairs(suite, suite_set)
    records: list[dict[str, Any]] = []
    for workdir, label in zip(workdirs, labels):
        run_cfg = run_config(workdir, config)
        evals = select_evals(run_cfg, extra=extra, only=only, include_config=include_config)
        payload = evaluate_checkpoint(run_cfg, workdir, extra=extra, only=only, include_config=include_config,
                                      robustness=robustness, **options)
        records.extend(metric_records(payload, evals, label, workdir, suite))
    if len(workdirs) == 1:
        default = os.path.join(workdirs[0], "eval_records.jsonl")
    else:
        default = os.path.join(os.path.commonpath([os.path.abspath(w) for w in workdirs]), "eval_records.jsonl")
    path = records_path or default
    if jax.process_index() == 0:
        write_records(path, records)
    print(f"Wrote {len(records)} metric records of {len(workdirs)} run(s) to {path}", flush=True)
    return records


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from softalign.config.errors import ConfigError
    from softalign.training.checkpointing import CheckpointNotFoundError
    from softalign.training.setup import MissingTokenizerError

    common.setup_logging()
    common.configure_xla_cpu("auto")  # the runs' dtype is read later; 'auto' is every preset's default
    try:
        workdirs = list(FLAGS.workdirs) or ([FLAGS.workdir] if FLAGS.workdir else [])
        if not workdirs:
            raise EvaluateError("give --workdir (one run) or --workdirs (several)")
        if FLAGS.output and len(workdirs) > 1:
            raise EvaluateError("--output names one results file: use it with a single run")
        extra = json.loads(FLAGS.evals) if FLAGS.evals else {}
        if not isinstance(extra, dict):
            raise EvaluateError("--evals must be a JSON object {name: {kind: ..., ...}}")
        dirs = dict(cifar10_dir=FLAGS.cifar10_dir, flickr8k_dir=FLAGS.flickr8k_dir, max_examples=FLAGS.max_examples)
        if not FLAGS.suite:
            extra.update(shortcut_evals(FLAGS.cifar10_dir, FLAGS.flickr8k_dir, FLAGS.flickr8k_split,
                                        FLAGS.max_examples))
        evaluate_runs(workdirs, config=FLAGS.config, suite=FLAGS.suite, extra=extra, suite_dirs=dirs,
                      records_path=FLAGS.records, step=FLAGS.step, only=FLAGS.only,
                      include_config=FLAGS.config_evals, progress=FLAGS.progress, output=FLAGS.output,
                      robustness=FLAGS.robustness)
    except json.JSONDecodeError as e:
        print(f"softalign: --evals is not valid JSON: {e}", file=sys.stderr)
        sys.exit(2)
    except (ConfigError, EvaluateError, CheckpointNotFoundError, MissingTokenizerError) as e:
        print(f"softalign: {'config error: ' if isinstance(e, ConfigError) else ''}{e}", file=sys.stderr)
        sys.exit(2)


def run() -> None:
    """The ``softalign-evaluate`` console script."""
    app.run(main, flags_parser=common.parse_flags)


if __name__ == "__main__":
    run()
