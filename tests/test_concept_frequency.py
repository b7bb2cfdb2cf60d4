"""Concept frequency: the inverted index against hand-counted captions (token and lemma rules), shards and
worker processes against one pass, the CLI's CSV and accuracy-vs-frequency plot, per-class zero-shot recall."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from trained_run import run_module

from softalign.data import pipeline
from softalign.evaluation.zeroshot import class_recalls
from softalign.tools import caption_index, concepts
from softalign.tools.concept_frequency import frequency_rows, per_class_accuracy

CAPTIONS = [
    "A dog runs on the grass.",          # 0
    "Two dogs and a cat",                # 1
    "The cat sleeps",                    # 2
    "A red car parked by a truck",       # 3
    "plus sign in red",                  # 4
    "a plane flying over a boat",        # 5
    "Dogs' ball",                        # 6
    "a CAT-like dog",                    # 7
]
SPECS = ["dog", "cat", "automobile", "truck", "frog", "cross=plus sign", "red", "red car=red car", "red dog=red dog",
         "airplane", "ship"]


def _frequencies(rule, synonyms=True, captions=CAPTIONS):
    found = concepts.build_concepts(SPECS, rule, synonyms)
    index = caption_index.index_captions(captions, set().union(*(c.terms for c in found)), rule, batch=3)
    return {c.name: index.frequency(c) for c in found}, {c.name: index.ids(c).tolist() for c in found}


def test_token_rule_against_hand_counts():
    freq, ids = _frequencies(concepts.token_terms)
    assert ids["dog"] == [0, 1, 6, 7]          # dogs (a synonym), "Dogs'" -> dogs, s
    assert ids["cat"] == [1, 2, 7]             # "CAT-like" -> cat, like
    assert freq == {"dog": 4, "cat": 3, "automobile": 1, "truck": 1, "frog": 0, "cross": 1, "red": 2, "red car": 1,
                    "red dog": 0, "airplane": 1, "ship": 1}
    plain, _ = _frequencies(concepts.token_terms, synonyms=False)
    assert plain["dog"] == 2 and plain["automobile"] == 0 and plain["cross"] == 1 and plain["airplane"] == 0


def test_lemma_rule_against_hand_counts():
    try:
        rule = concepts.lemma_normalizer()
    except concepts.LemmaUnavailable as e:
        pytest.skip(str(e))
    freq, ids = _frequencies(rule, synonyms=False)
    assert ids["dog"] == [0, 1, 6, 7] and ids["cat"] == [1, 2, 7]     # dogs -> dog without any synonym list
    assert freq["automobile"] == 0 and freq["red car"] == 1 and freq["cross"] == 1 and freq["truck"] == 1


def test_merged_shards_equal_one_pass():
    found = concepts.build_concepts(SPECS, concepts.token_terms)
    terms = set().union(*(c.terms for c in found))
    whole = caption_index.index_captions(CAPTIONS, terms, concepts.token_terms)
    parts = [caption_index.index_captions(CAPTIONS[a:b], terms, concepts.token_terms) for a, b in
             ((0, 3), (3, 3), (3, 8))]
    merged = caption_index.merge(parts)
    assert merged.num_captions == 8
    for c in found:
        np.testing.assert_array_equal(merged.ids(c), whole.ids(c))


def test_source_index_in_worker_processes_matches_a_brute_force_count():
    data = pipeline.default_data_config()
    data.update(train_size=300, caption_noise=0.3, train_fraction=0.5)
    found = concepts.build_concepts(["synthetic"], concepts.token_terms)
    serial = caption_index.index_source(data.to_dict(), found, workers=1, shard_size=37)
    parallel = caption_index.index_source(data.to_dict(), found, workers=2, shard_size=50)
    from softalign.data import noise
    from softalign.data.sources import build_source
    source = build_source(data, "train")
    caps = [c for i in range(len(source)) for c in noise.captions_of(source, i)]
    assert serial.num_records == parallel.num_records == len(source) == 150 and serial.num_captions == 150
    for c in found:
        brute = sum(any(all(t in concepts.token_terms([cap])[0] for t in alt) for alt in c.alternatives)
                    for cap in caps)
        assert serial.frequency(c) == parallel.frequency(c) == brute, c.name
    assert max(serial.frequency(c) for c in found) > 0


def test_per_class_recall_and_the_join(tmp_path):
    emb = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], np.float32)
    classifier = np.eye(2, dtype=np.float32)
    assert class_recalls(emb, classifier, np.array([0, 0, 1, 1]), ["red", "blue"]) == {"recall[red]": 1.0,
                                                                                       "recall[blue]": 0.5}
    path = tmp_path / "eval_results.json"
    path.write_text(json.dumps({"results": {"heldout": {"i2t_R@1": 0.1}, "color": {"top1": 0.7,
                                                                                    "recall[red]": 0.9}}}))
    assert per_class_accuracy(str(path)) == ("color", {"red": 0.9})
    with pytest.raises(ValueError, match="no per-class recall"):
        per_class_accuracy(str(path), "heldout")
    found = concepts.build_concepts(["red", "blue"], concepts.token_terms)
    index = caption_index.index_captions(CAPTIONS, {"red", "blue"}, concepts.token_terms)
    rows = frequency_rows(index, found, {"red": 0.9})
    assert rows[0]["frequency"] == 2 and rows[0]["fraction"] == 0.25 and rows[0]["accuracy"] == 0.9
    assert rows[1]["frequency"] == 0 and np.isnan(rows[1]["accuracy"])


def test_cli_writes_csv_and_plot(tmp_path):
    results = tmp_path / "eval_results.json"
    recalls = {f"recall[{c}]": 0.1 * i for i, c in enumerate(["red", "green", "blue", "yellow"])}
    results.write_text(json.dumps({"results": {"color": {"top1": 0.2, **recalls}}}))
    out = tmp_path / "cf"
    r = run_module("softalign.tools.concept_frequency", "--concepts=synthetic_color", "--max_records=400",
                   "--workers=1", f"--results={results}", f"--output_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "records/s" in r.stdout and "accuracy points per tenfold frequency" in r.stdout
    rows = list(csv.DictReader(open(out / "concept_frequency.csv")))
    assert [row["concept"] for row in rows][:3] == ["red", "green", "blue"] and len(rows) == 8
    assert all(int(row["frequency"]) > 0 for row in rows)
    assert os.path.getsize(out / "accuracy_vs_frequency.png") > 1000
    r = run_module("softalign.tools.concept_frequency", "--mode=lemma", "--spacy_model=no_such_model",
                   f"--output_dir={out}", "--max_records=10")
    assert r.returncode in (0, 2) and "Traceback" not in r.stderr


def test_cli_reads_a_finished_run_and_counts_its_colour_weights(tmp_path):
    from softalign.config.schema import base_config
    from softalign.workdir import CONFIG_FILE, RESULTS_FILE

    run = tmp_path / "run"
    run.mkdir()
    config = base_config()
    config.data.train_size, config.data.color_weights = 300, (3.0, 1.0) + (0.0,) * 6   # only red and green
    (run / CONFIG_FILE).write_text(json.dumps(config.to_dict()))
    (run / RESULTS_FILE).write_text(json.dumps({"results": {"color": {"recall[red]": 0.9, "recall[green]": 0.5}}}))
    r = run_module("softalign.tools.concept_frequency", f"--workdir={run}", "--concepts=synthetic_color",
                   "--eval_name=color", config=False)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["concept"]: row for row in csv.DictReader(open(run / "concept_frequency" / "concept_frequency.csv"))}
    red, green = int(rows["red"]["frequency"]), int(rows["green"]["frequency"])
    assert red > 2 * green > 0 and all(int(rows[c]["frequency"]) == 0 for c in ("blue", "white"))
    assert float(rows["red"]["accuracy"]) == 0.9 and (run / "concept_frequency" / "accuracy_vs_frequency.png").exists()
    r = run_module("softalign.tools.concept_frequency", f"--workdir={run}", "--output_dir=/tmp/x")
    assert r.returncode == 2 and "exactly one of --config" in r.stderr
