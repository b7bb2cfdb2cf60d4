"""The ground-truth evaluators: multi-positive retrieval (equals paired retrieval when every caption is unique; mAP
against scikit-learn) and the compositional probe's captions (true vs one attribute made false), end to end."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score
from test_scene_truth import parse

from softalign.config.errors import ConfigError
from softalign.data import pipeline, scene_truth, synthetic
from softalign.data.tokenizer import Tokenizer
from softalign.evaluation import suite
from softalign.evaluation.ground_truth import multi_positive_chance, multi_positive_metrics, probe_captions
from softalign.evaluation.retrieval import retrieval_metrics


def _emb(seed, n, d=6):
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_unique_captions_give_paired_retrieval():
    img, txt = _emb(0, 50), _emb(1, 50)
    multi = multi_positive_metrics(img, txt, np.eye(50, dtype=bool), ks=(1, 5, 10))
    paired = retrieval_metrics(img, txt, np.arange(50), ks=(1, 5, 10))
    for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"):
        assert multi[key] == paired[key], key
    s = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    rank = 1 + (s > s.diagonal()[:, None]).sum(1)
    np.testing.assert_allclose(multi["i2t_mAP"], np.mean(1.0 / rank), rtol=1e-6)   # one positive: AP = 1/rank


def test_many_positives_against_brute_force_and_sklearn():
    rng = np.random.default_rng(2)
    img, txt = _emb(3, 40), _emb(4, 60)
    pos = rng.random((40, 60)) < 0.08
    pos[np.arange(40), rng.integers(0, 60, 40)] = True
    pos[rng.integers(0, 40, 60), np.arange(60)] = True
    m = multi_positive_metrics(img, txt, pos, ks=(1, 5), chunk_size=7)
    s = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ (txt / np.linalg.norm(txt, axis=1, keepdims=True)).T
    top5 = np.argsort(-s, axis=1)[:, :5]
    assert m["i2t_R@5"] == np.mean([pos[i, top5[i]].any() for i in range(40)])
    assert m["t2i_R@1"] == np.mean([pos[np.argmax(s[:, j]), j] for j in range(60)])
    want = np.mean([average_precision_score(pos[i], s[i]) for i in range(40)])
    np.testing.assert_allclose(m["i2t_mAP"], want, rtol=1e-6)
    assert m["i2t_positives"] == pos.sum(1).mean()
    chance = multi_positive_chance(pos, (1, 5))
    assert chance["i2t_R@1"] >= np.mean(pos.sum(1) / 60) - 1e-9                 # at least a random ranking's
    popular = np.argmax(pos.sum(0))                                              # ... or the query-blind best
    assert chance["i2t_R@1"] >= np.mean(pos[:, popular]) - 1e-9
    specific = pos.sum(0) <= 3
    m = multi_positive_metrics(img, txt, pos, ks=(1, 5), specific=specific)
    rows = pos[:, specific].any(1)
    sub = multi_positive_metrics(img[rows], txt[specific], pos[np.ix_(rows, specific)], ks=(1, 5)) \
        if pos[np.ix_(rows, specific)].any(0).all() else None
    if sub is not None:
        assert m["i2t_specific_R@5"] == sub["i2t_R@5"] and m["i2t_specific_mAP"] == sub["i2t_mAP"]
    s_sp = s[np.ix_(rows, specific)]
    top1 = np.argmax(s_sp, axis=1)
    assert m["i2t_specific_R@1"] == np.mean(pos[np.ix_(rows, specific)][np.arange(rows.sum()), top1])


def test_ties_count_against_the_query():
    m = multi_positive_metrics(np.ones((4, 3)), np.ones((4, 3)), np.eye(4, dtype=bool), ks=(1,))
    assert m["i2t_R@1"] == 0.0 and m["i2t_mAP"] == pytest.approx(0.25)


def test_probe_captions_change_one_attribute_and_are_false():
    src = synthetic.SyntheticScenes("heldout", 300, seed=4)
    counts = dict.fromkeys(("color", "shape", "size", "position"), 0)
    for i in range(300):
        true, false = probe_captions(src, i)
        assert true == src.caption(i)
        scene_arr = src.truth(i)[scene_truth.SCENE]
        named, count = parse(true)
        for attr, text in false.items():
            f_named, f_count = parse(text)
            assert f_count == count and len(f_named) == len(named)
            diff = [(a, b) for x, y in zip(named, f_named) for a, b in zip(x, y) if a != b]
            assert len(diff) == 1 and diff[0][0] >= 0 and diff[0][1] >= 0, (true, text)
            changed = [synthetic.ATTRIBUTES[k] for x, y in zip(named, f_named) for k in range(4) if x[k] != y[k]]
            assert changed == [attr]
            assert not scene_truth.compatible(scene_truth.encode_caption(f_named, 3, f_count), scene_arr), text
            counts[attr] += 1
    assert min(counts.values()) > 60, counts


def _ctx_config(**data):
    class Config:
        pass
    c = Config()
    c.data = pipeline.default_data_config()
    c.data.update(image_size=8, heldout_size=80, **data)
    c.eval_batch_size = 32
    return c


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe(synthetic.caption_corpus(400), vocab_size=300, context_length=40)


def test_evaluators_run_end_to_end(tok):
    c = _ctx_config()
    evals = {"truth": dict(kind="multi_positive_retrieval", ks=(1, 5)),
             "probe": dict(kind="compositional_probe", num_examples=60)}
    truth, probe = suite.build_evaluators(c, tok, evals=evals)[::-1]
    proj_i, proj_t = _emb(5, 8 * 8 * 3, 16).T, _emb(6, 40, 16).T
    enc_img = lambda x: np.asarray(x).reshape(len(x), -1) @ proj_i.T
    enc_txt = lambda t: np.asarray(t, np.float32) @ proj_t.T
    m = truth.run(enc_img, enc_txt)
    assert set(m) == {"i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "i2t_mAP", "t2i_mAP", "i2t_positives",
                      "t2i_positives", "paired_i2t_R@1", "paired_i2t_R@5", "paired_t2i_R@1", "paired_t2i_R@5",
                      "i2t_specific_R@1", "i2t_specific_R@5", "i2t_specific_mAP", "i2t_specific_positives"}
    for key in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"):
        assert m[key] >= m[f"paired_{key}"]                 # the own pair is one of the positives
    assert m["i2t_positives"] >= 1.0 and truth.chance["i2t_R@1"] > 1 / 80
    p = probe.run(enc_img, enc_txt)
    assert set(p) == {"color_top1", "shape_top1", "size_top1", "position_top1", "mean_top1"}
    assert all(0.0 <= v <= 1.0 for v in p.values()) and probe.chance["mean_top1"] == 0.5
    with pytest.raises(ConfigError, match="data.source='synthetic'"):
        suite.build_evaluators(_ctx_config(source="arrayrecord", path="/tmp"), tok,
                               evals={"t": dict(kind="multi_positive_retrieval")})
