"""Standalone evaluation of a checkpoint: ``python -m softalign.evaluate --config=... --workdir=... [--step=N]``.

Restores only the parameters of the latest (or ``--step``) checkpoint in ``WORKDIR/checkpoints`` (an Orbax partial
restore: no optimizer or teacher state is read), rebuilds the model with the run's tokenizer (``WORKDIR/tokenizer.json``
or ``config.tokenizer.path``), runs every evaluator of ``config.evals`` plus any added by flags, prints a table and
writes ``WORKDIR/eval_results.json``. For example (the shared CIFAR-10 test folder and Flickr8k val split):

    python -m softalign.evaluate --config=configs/demo.py --workdir=/tmp/sa-demo \\
        --cifar10_dir=../shared/data/cifar10/test --flickr8k_dir=../shared/data/flickr8k

Any config key can be overridden with ``--config.key=value`` as for training (e.g. ``--config.eval_batch_size=512``).
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
config_flags.DEFINE_config_file("config", None, "The run's config file (configs/*.py).", lock_config=True)
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
flags.mark_flags_as_required(["config", "workdir"])
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
    evals: dict[str, Any] = dict(config.evals.to_dict()) if include_config else {}
    evals.update(extra or {})
    if only:
        unknown = sorted(set(only) - set(evals))
        if unknown:
            raise EvaluateError(f"--only names unknown evaluators {unknown}; known: {sorted(evals)}")
        evals = {k: v for k, v in evals.items() if k in only}
    if not evals:
        raise EvaluateError("no evaluators to run (config.evals is empty and no extra ones were given)")
    return evals


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
    size, length = config.data.image_size, config.model.text.context_length
    jax.block_until_ready(enc_img(jax.device_put(jax.numpy.zeros((batch, size, size, 3)), batch_sharding)))
    jax.block_until_ready(enc_txt(jax.device_put(jax.numpy.zeros((batch, length), jax.numpy.int32),
                                                 batch_sharding)))
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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from softalign.config.errors import ConfigError
    from softalign.training.checkpointing import CheckpointNotFoundError
    from softalign.training.setup import MissingTokenizerError

    common.setup_logging()
    try:
        extra = json.loads(FLAGS.evals) if FLAGS.evals else {}
        if not isinstance(extra, dict):
            raise EvaluateError("--evals must be a JSON object {name: {kind: ..., ...}}")
        extra.update(shortcut_evals(FLAGS.cifar10_dir, FLAGS.flickr8k_dir, FLAGS.flickr8k_split, FLAGS.max_examples))
        evaluate_checkpoint(FLAGS.config, FLAGS.workdir, step=FLAGS.step, extra=extra, only=FLAGS.only,
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
