"""Data reduction: exact indices on a hand-made embedding set (stride per cluster by distance to the centre,
top score fraction, intersection), data.subset_file in the sources and pipeline, and exact resume on it."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from trained_run import run_module, train_tiny

from softalign.data import pipeline, sources, subset
from softalign.tools import reduce

# Two clusters; distances to each centre's mean (0,0) and (100,0) are 1,1,2,2,3,3, laid out in a shuffled order
# in the second one.
EMB = np.array([(-1, 0), (1, 0), (0, 2), (0, -2), (-3, 0), (3, 0),                 # records 0-5: d 1 1 2 2 3 3
                (103, 0), (100, 2), (99, 0), (97, 0), (100, -2), (101, 0)], float)  # 6-11: d 3 2 1 3 2 1
ASSIGN = np.array([0] * 6 + [1] * 6)
SCORES = np.array([0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.95, 0.0, 0.85, 0.75, 0.05, 0.15])


def test_stride_selection_by_distance_to_the_centre():
    # cluster 0 in order 0,1,2,3,4,5 (ties by record number); cluster 1 in order 8,11,7,10,6,9.
    np.testing.assert_array_equal(reduce.stride_select(EMB, ASSIGN, 2), [0, 2, 4, 6, 7, 8])
    np.testing.assert_array_equal(reduce.stride_select(EMB, ASSIGN, 3), [0, 3, 8, 10])
    np.testing.assert_array_equal(reduce.stride_select(EMB, ASSIGN, 1), np.arange(12))


def test_top_fraction_and_the_intersection():
    np.testing.assert_array_equal(reduce.top_fraction(SCORES, 0.5), [0, 1, 2, 6, 8, 9])
    np.testing.assert_array_equal(reduce.top_fraction(np.zeros(4), 0.5), [0, 1])     # ties: lower first
    records = np.arange(100, 112)
    kept = reduce.select(EMB, SCORES, ASSIGN, records, stride=2, score_fraction=0.5)
    np.testing.assert_array_equal(kept, [100, 102, 106, 108])
    with pytest.raises(ValueError, match="score_fraction"):
        reduce.top_fraction(SCORES, 0.0)


@pytest.mark.parametrize("backend", ["sklearn", "faiss"])
def test_kmeans_backends_find_the_two_clusters(backend):
    if backend == "faiss":
        pytest.importorskip("faiss", reason="faiss-cpu is optional (pip install faiss-cpu)")
    assign = reduce.cluster(EMB, 2, backend=backend)
    assert len(set(assign[:6])) == 1 and len(set(assign[6:])) == 1 and assign[0] != assign[6]
    kept = reduce.select(EMB, SCORES, assign, np.arange(12), stride=2, score_fraction=0.5)
    np.testing.assert_array_equal(kept, [0, 2, 6, 8])


def _data(tmp_path, indices, **overrides):
    path = str(tmp_path / "subset.npy")
    np.save(path, np.asarray(indices))
    cfg = pipeline.default_data_config()
    cfg.update(dict(train_size=40, heldout_size=8, num_threads=0, prefetch_buffer_size=1, subset_file=path))
    cfg.update(overrides)
    return cfg


def test_subset_file_source_renumbers_in_file_order(tmp_path):
    full = sources.build_source(_data(tmp_path, [0]).to_dict() | {"subset_file": ""}, "train")
    cut = sources.build_source(_data(tmp_path, [7, 3, 30, 12]), "train")
    assert len(cut) == 4 and cut.full_size == 40
    for k, original in enumerate([7, 3, 30, 12]):
        assert cut[k]["index"] == k and cut[k]["caption"] == full[original]["caption"]
        np.testing.assert_array_equal(cut[k]["image"], full[original]["image"])
    both = sources.build_source(_data(tmp_path, [7, 3, 30, 12], train_fraction=0.5), "train")
    assert len(both) == 2 and {both.source.original_index(both.original_index(k)) for k in range(2)} <= {7, 3, 30, 12}
    for bad, message in (([1, 1], "distinct"), ([40], r"in \[0, 40\)"), ([[1]], "1-D integer")):
        with pytest.raises(ValueError, match=message):
            sources.build_source(_data(tmp_path, bad), "train")
    assert not isinstance(sources.build_source(_data(tmp_path, [1]), "heldout"), subset.TrainSubset)


def _params(workdir, step):
    return ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))["params"]


def test_training_on_a_reduced_index_resumes_exactly(tmp_path):
    run = train_tiny(str(tmp_path / "teacher"), "--config.num_steps=2", "--config.checkpoint_every=2",
                     "--config.data.caption_noise=0.5")
    index = str(tmp_path / "reduced.npy")
    r = run_module("softalign.tools.reduce", f"--workdir={run}", "--clusters=8", "--stride=2",
                   "--score_fraction=0.6", f"--output={index}", "--backend=sklearn", config=False)
    assert r.returncode == 0, r.stderr[-3000:]
    kept = np.load(index)
    summary = json.load(open(str(tmp_path / "reduced.json")))
    assert summary["records_embedded"] == 400 and summary["kept"] == len(kept) and 16 <= len(kept) < 240
    assert np.all(np.diff(kept) > 0) and kept.max() < 400 and "Kept" in r.stdout
    data = json.load(open(os.path.join(run, "config.json")))["data"]
    truth = sources.build_source(data, "train")
    swapped = np.array([truth._swap_partner(i) is not None for i in range(400)])
    assert summary["swapped_fraction_embedded"] == swapped.mean() and 0.3 < swapped.mean() < 0.7
    assert summary["swapped_fraction_kept"] == swapped[kept].mean() and "Swapped captions" in r.stdout
    flags = [f"--config.data.subset_file={index}", "--config.num_steps=4", "--config.checkpoint_every=2"]
    straight = train_tiny(str(tmp_path / "straight"), *flags)
    sliced = train_tiny(str(tmp_path / "sliced"), *flags, "--config.stop_at_step=2")
    sliced = train_tiny(sliced, *flags)
    a, b = _params(straight, 4), _params(sliced, 4)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
