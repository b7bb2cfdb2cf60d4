"""Bad records are skipped and counted -- never fatal, never silent -- in every format where each kind can occur.

Each test writes a small dataset with every applicable kind of bad record among good ones, then checks that
(1) the pipeline's own stages (decode map -> drop bad before batching -> batch -> count) emit exactly the good
records, in order, in full batches, with the right `data/skipped/<reason>` counts; (2) the converter writes exactly
the good records, in order, and its summary names the same reasons; (3) the shuffled train iterator only serves
good records in full batches.
"""

import io
import json
import os

import data_fixtures
import grain
import numpy as np
import pytest

from softalign.data import convert, pipeline, skips, sources
from softalign.data.arrayrecord import ArrayRecordSource, encode_record
from softalign.data.tokenizer import Tokenizer

L = 16
BATCH = 4


@pytest.fixture(scope="module")
def tok():
    words = ["a dog runs on the beach", "two people walk", "a red car", "children play in the park"]
    return Tokenizer.train_bpe(words * 20, vocab_size=300, context_length=L)


def _specs(seed=0):
    """[(key, image bytes, [caption bytes], expected skip reason or None, dropped_caption counts)]: every kind of
    bad image and caption, each followed by a good record; a 100 kB caption and a multi-caption record with one
    empty caption are good."""
    rng = np.random.default_rng(seed)
    specs = []

    def good(tag):
        specs.append((f"good{len(specs):03d}{tag}", data_fixtures.jpeg(rng, 40, 30), [f"photo {len(specs)}".encode()],
                      None, {}))

    for reason, data in data_fixtures.bad_images(rng).items():
        good("")
        specs.append((f"bad{len(specs):03d}", data, [b"a caption"], reason, {}))
    for reason, caption in data_fixtures.BAD_CAPTIONS.items():
        good("")
        specs.append((f"bad{len(specs):03d}", data_fixtures.jpeg(rng, 40, 30), [caption], reason, {}))
    specs.append((f"good{len(specs):03d}long", data_fixtures.jpeg(rng, 40, 30),
                  [data_fixtures.long_caption().encode()], None, {}))
    specs.append((f"good{len(specs):03d}multi", data_fixtures.jpeg(rng, 40, 30), [b"", b"a cat", b"a small cat"],
                  None, {"dropped_caption/empty_caption": 1}))
    good("")
    return specs


def _expected_counts(specs, extra=None):
    counts = {}
    for _, _, _, reason, dropped in specs:
        if reason:
            counts[f"skipped/{reason}"] = counts.get(f"skipped/{reason}", 0) + 1
        for k, v in dropped.items():
            counts[k] = counts.get(k, 0) + v
    for k, v in (extra or {}).items():
        counts[k] = counts.get(k, 0) + v
    return counts


def _ordered_pass(source, tokenizer):
    """The pipeline's stages without shuffling: returns (good indices in output order, batch sizes)."""
    augment = pipeline.DecodeAndAugment(16, (1.0, 1.0), (1.0, 1.0))
    collate = pipeline.CollateAndTokenize(tokenizer, pipeline.CLIP_MEAN, pipeline.CLIP_STD)
    ds = grain.MapDataset.source(source).random_map(augment, seed=0)
    it = skips.SkipBadIterDataset(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))
    it = it.batch(BATCH, drop_remainder=False, batch_fn=collate).map(skips.StatsSink())
    batches = list(it)
    assert all(skips.STATS_KEY not in b for b in batches)
    return [int(i) for b in batches for i in b["index"]], [len(b["index"]) for b in batches], batches


def _check(source, specs_in_source_order, tokenizer, extra_counts=None):
    """specs_in_source_order[i] describes source[i] (or None for records only the source knows about)."""
    good = [i for i, spec in enumerate(specs_in_source_order) if spec is not None and spec[3] is None]
    indices, sizes, batches = _ordered_pass(source, tokenizer)
    assert indices == good                                          # every good record, in order, nothing else
    assert all(s == BATCH for s in sizes[:-1])                       # full batches (the last is the remainder)
    expected = _expected_counts([s for s in specs_in_source_order if s is not None], extra_counts)
    assert skips.counts() == expected
    metrics = pipeline.data_metrics()
    for key, value in expected.items():
        assert metrics[f"data/{key}"] == value
    long_pos = [k for k, i in enumerate(indices) if "long" in specs_in_source_order[i][0]][0]
    row = np.concatenate([b["tokens"] for b in batches])[long_pos]
    assert row[-1] == tokenizer.eot_id and row[0] == tokenizer.sot_id   # 100 kB caption: truncated, eot last
    return expected


def _check_converted(tmp_path, argv, good_keys_or_captions, expected_counts, by="key"):
    out = str(tmp_path / "converted")
    lines = convert.main([*argv, f"--output_dir={out}", "--num_shards=2", "--quiet", "--splits=train"])
    info = json.load(open(os.path.join(out, "dataset_info.json")))["splits"]["train"]
    assert info["records"] == len(good_keys_or_captions)
    skipped = {f"skipped/{k}": v for k, v in info["skipped"].items()}
    assert skipped == {k: v for k, v in expected_counts.items() if k.startswith("skipped/")}
    for reason in info["skipped"]:
        assert reason in lines[0]
    src = ArrayRecordSource(sorted(str(p) for p in (tmp_path / "converted").glob("train-*.array_record")))
    got = [src[i]["key"] if by == "key" else src[i]["captions"][-1] for i in range(len(src))]
    assert got == good_keys_or_captions


def _check_train_iterator(cfg, tokenizer, n_good):
    it = pipeline.make_train_iterator(cfg, tokenizer, global_batch_size=BATCH, seed=0)
    seen = []
    for _ in range(n_good // BATCH):
        batch = next(it)
        assert batch["image"].shape[0] == BATCH and set(batch) == {"image", "tokens", "index"}
        seen.extend(batch["index"].tolist())
    assert len(set(seen)) == len(seen)                               # first epoch: no repeats, only good ones
    return seen


def test_arrayrecord_bad_records(tmp_path, tok):
    skips.reset()
    specs = _specs(0)
    half = len(specs) // 2

    def rec(spec):
        key, image, captions, _, _ = spec
        return encode_record(image, [c if isinstance(c, bytes) else c for c in captions], key=key)

    shard0, shard1, shard2 = (str(tmp_path / f"train-0000{k}-of-00003.array_record") for k in range(3))
    data_fixtures.write_arrayrecord(shard0, [rec(s) for s in specs[:half]])
    marker = b"CORRUPT-ME-PLEASE-0123456789"
    corrupt_spec = ("badcorrupt", data_fixtures.jpeg(np.random.default_rng(9), 40, 30), [marker], "corrupt_record", {})
    garbage_spec = ("badgarbage", b"", [], "corrupt_record", {})
    in_shard1 = specs[half:-1] + [corrupt_spec, garbage_spec, specs[-1]]
    data_fixtures.write_arrayrecord(shard1, [b"\x93not a msgpack map at all" if s is garbage_spec else rec(s)
                                        for s in in_shard1])
    data_fixtures.corrupt_record_in_place(shard1, marker)
    with open(shard2, "wb") as f:                                    # a corrupt shard: not even a footer
        f.write(os.urandom(5000))
    source = sources.build_source({"source": "arrayrecord", "path": str(tmp_path)}, "train")
    order = specs[:half] + in_shard1
    assert len(source) == len(order)
    expected = _check(source, order, tok, {"skipped/corrupt_shard": 1})
    assert expected["skipped/corrupt_record"] == 2

    good_keys = [s[0] for s in order if s[3] is None]
    _check_converted(tmp_path, ["--source=arrayrecord", f"--input={tmp_path}"], good_keys,
                     {k: v for k, v in expected.items()})
    cfg = pipeline.default_data_config()
    cfg.update(dict(source="arrayrecord", path=str(tmp_path), image_size=16, num_threads=2))
    seen = _check_train_iterator(cfg, tok, len(good_keys))
    assert all(order[i][3] is None for i in seen)


def test_webdataset_bad_records(tmp_path, tok):
    skips.reset()
    specs = [(k, im, caps[-1:], reason, {}) if k.endswith("multi") else (k, im, caps, reason, dropped)
             for k, im, caps, reason, dropped in _specs(1)]        # one .txt per key: a single caption
    half = len(specs) // 2
    rng = np.random.default_rng(5)

    def members(spec):
        key, image, captions, _, _ = spec
        return [(f"{key}.jpg", image), (f"{key}.txt", captions[0]), (f"{key}.json", json.dumps({"key": key}).encode())]

    shards = tmp_path / "shards"
    shards.mkdir()
    first = [m for s in specs[:half] for m in members(s)]
    first += [("nocaption.jpg", data_fixtures.jpeg(rng, 40, 30)), ("nocaption.json", b"{}")]      # missing .txt
    first += [("noimage.txt", b"a caption without its image")]                               # missing image
    data_fixtures.write_tar(str(shards / "00000.tar"), first)
    second = [m for s in specs[half:] for m in members(s)]
    cut_key = "lostatcut"
    second += [(f"{cut_key}.jpg", data_fixtures.jpeg(rng, 200, 150)), (f"{cut_key}.txt", b"never read")]
    data_fixtures.write_tar(str(shards / "00001.tar"), second)
    data = (shards / "00001.tar").read_bytes()
    start = data.find(f"{cut_key}.jpg".encode())
    (shards / "00001.tar").write_bytes(data[: start + 512 + 1000])  # cut inside the last image's data

    source = sources.build_source({"source": "webdataset", "path": str(shards)}, "train")
    assert os.path.exists(str(shards / "00000.tar") + ".index.json")   # index cached beside the shard
    order = specs                     # keys without caption/image and the cut one never become records
    assert len(source) == len(order)
    extra = {"skipped/missing_caption": 1, "skipped/missing_image": 1, "skipped/truncated_shard": 1}
    expected = _check(source, order, tok, extra)
    good_keys = [s[0] for s in order if s[3] is None]
    _check_converted(tmp_path, ["--source=webdataset", f"--input={shards}"], good_keys, expected)
    cfg = pipeline.default_data_config()
    cfg.update(dict(source="webdataset", path=str(shards), image_size=16, num_threads=2))
    _check_train_iterator(cfg, tok, len(good_keys))


def test_folder_bad_records(tmp_path, tok):
    skips.reset()
    specs = _specs(2)
    rng = np.random.default_rng(6)
    items = [(key + ".jpg", image, captions) for key, image, captions, _, _ in specs]
    missing = ("missingfile.jpg", None, [b"its file is not there"])
    items.insert(3, missing)
    names = [name for name, _, _ in items] + ["uncaptioned.jpg"]
    data_fixtures.write_folder(str(tmp_path), items, splits={"train": names, "val": [names[0]]})
    (tmp_path / "images" / "uncaptioned.jpg").write_bytes(data_fixtures.jpeg(rng, 40, 30))
    source = sources.build_source({"source": "folder", "path": str(tmp_path)}, "train")
    order = [(k + ".jpg", *rest) for k, *rest in specs]
    order.insert(3, ("missingfile.jpg", None, [], "missing_image", {}))
    assert len(source) == len(order)
    expected = _check(source, order, tok, {"skipped/missing_caption": 1})
    good = [s[0] for s in order if s[3] is None]
    _check_converted(tmp_path, ["--source=folder", f"--input={tmp_path}"], good, expected)
    cfg = pipeline.default_data_config()
    cfg.update(dict(source="folder", path=str(tmp_path), image_size=16, num_threads=2))
    _check_train_iterator(cfg, tok, len(good))


tfds = pytest.importorskip("tensorflow_datasets")


class SoftalignBadRecords(tfds.core.GeneratorBasedBuilder):
    """A TFDS dataset of encoded images and caption lists, prepared without TensorFlow."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "id": tfds.features.Scalar(np.int64)}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, (_, image, captions, _, _) in enumerate(_specs(3)):
            yield i, {"image": io.BytesIO(image), "captions": list(captions), "id": i}


def test_tfds_bad_records(tmp_path, tok):
    skips.reset()
    data_dir = str(tmp_path / "tfds")
    SoftalignBadRecords(data_dir=data_dir, file_format="array_record").download_and_prepare()
    skips.reset()
    specs = _specs(3)
    cfg = {"source": "tfds", "name": "softalign_bad_records", "path": data_dir, "caption_field": "captions"}
    source = sources.build_source(cfg, "train")
    raw = tfds.data_source("softalign_bad_records", split="train", data_dir=data_dir,
                           decoders={"image": tfds.decode.SkipDecoding()})
    ids = [int(raw[i]["id"]) for i in range(len(raw))]              # TFDS stores examples in its own order
    order = [specs[i] for i in ids]
    _check(source, order, tok)
    good_captions = [s[2][-1].decode().strip() for s in order if s[3] is None]
    _check_converted(tmp_path, ["--source=tfds", "--input=softalign_bad_records", f"--data_dir={data_dir}",
                                "--caption_field=captions"], good_captions, _expected_counts(order), by="caption")
