"""``python -m softalign.tools.concept_frequency``: how often each concept occurs in a training source's captions,
and -- joined with per-class zero-shot accuracy -- how accuracy grows with log10 frequency.

    python -m softalign.tools.concept_frequency --config=configs/demo.py --concepts=synthetic \\
        --max_records=100000 --output_dir=/tmp/cf

writes ``concept_frequency.csv`` (concept, alternatives, captions containing it, fraction). ``--workdir=RUN``
instead of ``--config`` reads a finished run: its ``config.json`` names the source, its ``eval_results.json`` gives
the accuracies and ``RUN/concept_frequency/`` is the default output. With
``--results=WORKDIR/eval_results.json --eval_name=NAME`` (an evaluator run with ``per_class: True``, which stores
``recall[<class>]``) it adds each class's accuracy and writes ``accuracy_vs_frequency.png`` with the fitted slope
(accuracy points per tenfold frequency). Without ``--concepts`` the concepts are the class names of
``--eval_name``'s dataset (with synonyms), else the synthetic vocabulary for the synthetic source, else CIFAR-10's
classes. Term rules, synonyms and concept specs: `softalign.tools.concepts`; the index: `caption_index`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from typing import Any, Optional, Sequence

from absl import app, flags
from ml_collections import config_flags

from softalign.tools import caption_index, concepts, plots
from softalign.tools.common import run_tool

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined on first use, not at import)."""
    config_flags.DEFINE_config_file("config", None, "The run's config file; its data section names the source.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", "", "A training run instead of --config: its config.json, its eval_results.json "
                        "(unless --results) and, unless --output_dir, WORKDIR/concept_frequency.")
    flags.DEFINE_list("concepts", [], "Concept specs: names, name=alt|alt, or cifar10 / synthetic / synthetic_<attr>.")
    flags.DEFINE_string("concepts_file", "", "A file of concept specs, one per line.")
    flags.DEFINE_bool("synonyms", True, "Add the built-in synonyms and plurals of known class names.")
    flags.DEFINE_enum("mode", "token", ["token", "lemma"], "Term rule: lowercased tokens, or spaCy lemmas.")
    flags.DEFINE_string("spacy_model", "en_core_web_sm", "spaCy pipeline for --mode=lemma (else its lookup tables).")
    flags.DEFINE_string("split", "train", "The source split to count ('train': as training reads it).")
    flags.DEFINE_integer("max_records", 0, "Count only the first N records (0: all).")
    flags.DEFINE_integer("workers", 1, "Worker processes over shards (1: in this process; 0: one per core from "
                         "200k records on).")
    flags.DEFINE_integer("shard_size", 0, "Records per shard (0: about 4 shards per worker, at most 100k).")
    flags.DEFINE_string("results", "", "An eval_results.json with per-class recall[<class>] entries to join.")
    flags.DEFINE_string("eval_name", "", "The evaluator in --results (and in config.evals, for default concepts).")
    flags.DEFINE_string("output_dir", None, "Where to write concept_frequency.csv and accuracy_vs_frequency.png.")



def default_specs(config: Any, eval_name: str = "") -> list[str]:
    """Concepts when none are given: ``eval_name``'s class names, else the synthetic vocabulary, else CIFAR-10."""
    if eval_name and eval_name in config.evals:
        options = config.evals[eval_name].to_dict()
        if options.get("kind") == "synthetic_zeroshot":
            return [f"synthetic_{options.get('attribute') or 'color'}"]
        dataset = options.get("dataset") or {}
        if dataset.get("type") == "synthetic":
            return [f"synthetic_{dataset.get('attribute') or 'color'}"]
        if dataset:
            from softalign.evaluation.datasets import ImageContext, load_classification
            data = load_classification(dataset, ImageContext.from_data_config(config.data), where=eval_name)
            return list(data.classnames)
    return ["synthetic"] if config.data.source == "synthetic" else ["cifar10"]


def per_class_accuracy(results_path: str, eval_name: str = "") -> tuple[str, dict[str, float]]:
    """``(evaluator, {class: recall})`` from an eval_results.json (the first evaluator with ``recall[...]``
    entries when `eval_name` is empty)."""
    with open(results_path) as f:
        results = json.load(f).get("results", {})
    names = [eval_name] if eval_name else sorted(results)
    for name in names:
        recalls = {k[len("recall["):-1]: float(v) for k, v in results.get(name, {}).items()
                   if k.startswith("recall[") and k.endswith("]")}
        if recalls:
            return name, recalls
    where = f"evaluator {eval_name!r}" if eval_name else "any evaluator"
    raise ValueError(f"{results_path}: {where} has no per-class recall[<class>] entries (evaluate with "
                     "per_class: True; known evaluators: " + ", ".join(sorted(results)) + ")")


def frequency_rows(index: caption_index.CaptionIndex, concept_list: Sequence[concepts.Concept],
                   accuracy: Optional[dict[str, float]] = None) -> list[dict[str, Any]]:
    """One row per concept: frequency, fraction of captions, log10 frequency, and the class accuracy if known."""
    rows = []
    for c in concept_list:
        freq = index.frequency(c)
        row = {"concept": c.name, "alternatives": c.describe(), "frequency": freq,
               "fraction": freq / index.num_captions if index.num_captions else 0.0,
               "log10_frequency": math.log10(freq) if freq else float("-inf")}
        if accuracy is not None:
            row["accuracy"] = accuracy.get(c.name, float("nan"))
        rows.append(row)
    return rows


def write_outputs(rows: list[dict[str, Any]], output_dir: str, title: str) -> dict[str, Any]:
    """Writes the CSV and, when rows carry accuracies, the PNG; returns paths and the fit."""
    os.makedirs(output_dir, exist_ok=True)
    out: dict[str, Any] = {"csv": os.path.join(output_dir, "concept_frequency.csv")}
    with open(out["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    if rows and "accuracy" in rows[0]:
        used = [r for r in rows if r["frequency"] > 0 and math.isfinite(r["accuracy"])]
        x, y = [r["log10_frequency"] for r in used], [100 * r["accuracy"] for r in used]
        out["fit"] = dict(zip(("slope", "intercept", "r"), plots.fit_line(x, y)), classes=len(used),
                          left_out=[r["concept"] for r in rows if r not in used])
        out["png"] = os.path.join(output_dir, "accuracy_vs_frequency.png")
        plots.scatter_fit(out["png"], x, y, [r["concept"] for r in used], xlabel="log10(captions with the concept)",
                          ylabel="per-class zero-shot accuracy (%)", title=title,
                          fit=tuple(out["fit"][k] for k in ("slope", "intercept", "r")))
    return out


def _inputs(config: Any, workdir: str, results: str, output_dir: Optional[str]) -> tuple[Any, str, str]:
    """``(config, results file or '', output dir)`` from the flags: --config, or --workdir's own files."""
    if (config is None) == (not workdir):
        raise ValueError("give exactly one of --config (a config file) and --workdir (a finished run)")
    if workdir:
        from softalign import api
        from softalign.workdir import CONFIG_FILE, RESULTS_FILE

        saved = os.path.join(workdir, CONFIG_FILE)
        if not os.path.exists(saved):
            raise ValueError(f"{saved} is missing: --workdir needs a run that wrote its config.json")
        config = api.as_config(saved)
        results = results or os.path.join(workdir, RESULTS_FILE)
        output_dir = output_dir or os.path.join(workdir, "concept_frequency")
    if not output_dir:
        raise ValueError("--output_dir is required with --config")
    return config, results, output_dir


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        config, results, output_dir = _inputs(FLAGS.config, FLAGS.workdir, FLAGS.results, FLAGS.output_dir)
        specs = list(FLAGS.concepts) + (concepts.read_concepts_file(FLAGS.concepts_file) if FLAGS.concepts_file
                                        else [])
        rule = concepts.normalizer(FLAGS.mode, FLAGS.spacy_model)
        concept_list = concepts.build_concepts(specs or default_specs(config, FLAGS.eval_name), rule, FLAGS.synonyms)
        accuracy = None
        if results:
            eval_name, accuracy = per_class_accuracy(results, FLAGS.eval_name)
    except (concepts.LemmaUnavailable, ValueError, OSError) as e:
        print(f"softalign: {e}", file=sys.stderr)
        sys.exit(2)
    data = config.data.to_dict()
    progress = lambda done, total: print(f"  shards {done}/{total}", file=sys.stderr, flush=True)
    index = caption_index.index_source(data, concept_list, split=FLAGS.split, mode=FLAGS.mode,
                                       model=FLAGS.spacy_model, max_records=FLAGS.max_records,
                                       workers=FLAGS.workers, shard_size=FLAGS.shard_size, progress=progress)
    rows = frequency_rows(index, concept_list, accuracy)
    print(f"{index.num_records:,} records, {index.num_captions:,} captions ({index.skipped} skipped) of "
          f"{data['source']}/{FLAGS.split} in {index.seconds:.1f} s: {index.num_records / index.seconds:,.0f} "
          f"records/s, {index.num_captions / index.seconds:,.0f} captions/s ({index.workers} process(es), "
          f"{FLAGS.mode} rule)")
    width = max(len(r["concept"]) for r in rows)
    for r in sorted(rows, key=lambda r: -r["frequency"]):
        extra = f"  accuracy {100 * r['accuracy']:.1f}%" if "accuracy" in r and math.isfinite(r["accuracy"]) else ""
        print(f"  {r['concept']:<{width}}  {r['frequency']:>9,}  ({100 * r['fraction']:.2f}%){extra}")
    title = f"{data['source']} captions" + (f" vs {eval_name} accuracy" if accuracy is not None else "")
    out = write_outputs(rows, output_dir, title)
    if "fit" in out:
        fit = out["fit"]
        print(f"fit over {fit['classes']} classes: {fit['slope']:.2f} accuracy points per tenfold frequency "
              f"(r = {fit['r']:.2f}); left out (no captions or no accuracy): {fit['left_out'] or 'none'}")
        print(f"Wrote {out['png']}")
    print(f"Wrote {out['csv']}")


def run() -> None:
    run_tool(main, define_flags)


if __name__ == "__main__":
    run()
