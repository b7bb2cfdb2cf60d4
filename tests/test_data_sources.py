"""The real-data sources (arrayrecord, webdataset, folder, tfds), shard path resolution, the record format, the
converter CLI, caption noise as a wrapper, and the Flickr8k conversion when the shared copy is present."""

import io
import json
import os
import pickle

import data_fixtures
import numpy as np
import pytest

from softalign.data import convert, noise, pipeline, registry, skips, sources, webdataset
from softalign.data.arrayrecord import decode_record, encode_record
from softalign.data.folder import build_folder_source
from softalign.data.tokenizer import Tokenizer, corpus_tokenizer, read_captions

FLICKR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "flickr8k")


def _images(n, seed=0, w=40, h=30):
    rng = np.random.default_rng(seed)
    return [data_fixtures.jpeg(rng, w, h) for _ in range(n)]


def test_record_format_roundtrip_and_errors():
    data = encode_record(b"\xff\xd8jpeg", ["one", "two"], key="k1", meta={"url": "http://x"})
    rec = decode_record(data)
    assert rec["image"] == b"\xff\xd8jpeg" and rec["captions"] == ["one", "two"] and rec["key"] == "k1"
    assert rec["meta"] == {"url": "http://x"} and rec["v"] == 1
    assert decode_record(encode_record(b"x", b"\xffraw"))["captions"] == [b"\xffraw"]   # bytes stay bytes
    for bad in (b"", b"\xc1garbage", b"\x92\x01\x02"):
        with pytest.raises(ValueError):
            decode_record(bad)


def test_shard_paths(tmp_path):
    for name in ("train-00000-of-00002.array_record", "train-00001-of-00002.array_record",
                 "val-00000-of-00001.array_record"):
        (tmp_path / name).write_bytes(b"")
    sub = tmp_path / "test"
    sub.mkdir()
    (sub / "a.array_record").write_bytes(b"")
    ext = ".array_record"
    assert [os.path.basename(p) for p in registry.shard_paths(str(tmp_path), "train", ext)] == [
        "train-00000-of-00002.array_record", "train-00001-of-00002.array_record"]
    assert len(registry.shard_paths(str(tmp_path), "val", ext)) == 1
    assert registry.shard_paths(str(tmp_path), "test", ext) == [str(sub / "a.array_record")]
    assert len(registry.shard_paths(str(tmp_path / "{split}-*.array_record"), "train", ext)) == 2
    listed = f"{tmp_path}/val-00000-of-00001.array_record,{tmp_path}/train-0000[1]-of-00002.array_record"
    assert len(registry.shard_paths(listed, "x", ext)) == 2
    with pytest.raises(ValueError, match="no .array_record shards for split 'other'"):
        registry.shard_paths(str(tmp_path), "other", ext)
    with pytest.raises(ValueError, match="data.path is empty"):
        registry.shard_paths("", "train", ext)
    cfg = {"train_split": "tr", "heldout_split": "dev"}
    assert [registry.resolve_split(cfg, s) for s in ("train", "heldout", "test")] == ["tr", "dev", "test"]
    unsplit = tmp_path / "unsplit"  # shards without a train- prefix: all of them train, except a held-out split's
    unsplit.mkdir()
    for name in ("shard-0.tar", "shard-1.tar", "val-00000.tar", "test-00000.tar"):
        (unsplit / name).write_bytes(b"")
    assert [os.path.basename(p) for p in registry.shard_paths(str(unsplit), "train", ".tar", train=True)] == [
        "shard-0.tar", "shard-1.tar"]
    assert [os.path.basename(p) for p in registry.shard_paths(str(unsplit), "val", ".tar")] == ["val-00000.tar"]


def test_folder_flickr_csv_token_file_and_coco(tmp_path):
    images = _images(3)
    flickr = tmp_path / "flickr"
    data_fixtures.write_folder(str(flickr), [("a.jpg", images[0], ["a dog, running", "a brown dog"]),
                                        ("b.jpg", images[1], ["a cat"]), ("c.jpg", images[2], ["a car"])],
                          splits={"train": ["c.jpg", "a.jpg"], "val": ["b.jpg"]})
    train = build_folder_source(str(flickr), "train", train=True)
    assert [r["key"] for r in (train[0], train[1])] == ["c.jpg", "a.jpg"]       # splits.json order
    assert train[1]["captions"] == ["a dog, running", "a brown dog"] and train[1]["image"] == images[0]
    assert len(build_folder_source(str(flickr), "val")) == 1
    with pytest.raises(ValueError, match="split 'test' not in"):
        build_folder_source(str(flickr), "test")

    token = tmp_path / "token"
    (token / "images").mkdir(parents=True)
    (token / "images" / "x.jpg").write_bytes(images[0])
    (token / "Flickr8k.token.txt").write_text("x.jpg#0\tfirst caption\nx.jpg#1\tsecond caption\n")
    src = build_folder_source(str(token), "train", train=True)
    assert len(src) == 1 and src[0]["captions"] == ["first caption", "second caption"]
    with pytest.raises(ValueError, match="only has a train split"):
        build_folder_source(str(token), "val")

    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "val2017").mkdir()
    (coco / "val2017" / "000001.jpg").write_bytes(images[2])
    (coco / "annotations" / "captions_val2017.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "000001.jpg"}, {"id": 2, "file_name": "000002.jpg"}],
        "annotations": [{"image_id": 1, "caption": "a car"}, {"image_id": 1, "caption": "a red car"},
                        {"image_id": 2, "caption": "gone"}]}))
    src = sources.build_source({"source": "folder", "path": str(coco)}, "heldout")
    assert len(src) == 2 and src[0]["captions"] == ["a car", "a red car"] and src[0]["image"] == images[2]
    assert src[1]["_skip"] == skips.MISSING_IMAGE
    assert convert.default_splits("folder", str(coco)) == ["val"]


def test_webdataset_index_cache_and_read_only(tmp_path, monkeypatch):
    images = _images(3)
    members = []
    for i, image in enumerate(images):
        members += [(f"{i:06d}.jpg", image), (f"{i:06d}.txt", f"caption {i}".encode()),
                    (f"{i:06d}.json", b"{}")]
    data_fixtures.write_tar(str(tmp_path / "00000.tar"), members)
    src = sources.build_source({"source": "webdataset", "path": str(tmp_path)}, "train")
    assert len(src) == 3 and src[2]["image"] == images[2] and src[2]["captions"] == [b"caption 2"]
    assert src[1]["key"] == "000001" and src.captions_of(0) == [b"caption 0"]
    cache = tmp_path / ("00000.tar" + webdataset.INDEX_SUFFIX)
    assert json.loads(cache.read_text())["records"][0][0] == "000000"

    calls = []
    monkeypatch.setattr(webdataset, "scan_tar", lambda path: calls.append(path) or pytest.fail("rescanned"))
    assert len(webdataset.WebDatasetSource([str(tmp_path / "00000.tar")])) == 3      # cached index reused
    monkeypatch.undo()

    ro = tmp_path / "ro"
    ro.mkdir()
    data_fixtures.write_tar(str(ro / "00000.tar"), members[:3])

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(webdataset.os, "replace", refuse)
    src = webdataset.WebDatasetSource([str(ro / "00000.tar")])
    assert len(src) == 1 and not (ro / ("00000.tar" + webdataset.INDEX_SUFFIX)).exists()
    assert [p.name for p in ro.iterdir()] == ["00000.tar"]                             # no stray temp file
    clone = pickle.loads(pickle.dumps(src))                                             # travels to workers
    assert clone[0]["image"] == images[0]


def test_sources_pickle_for_worker_processes(tmp_path):
    images = _images(2)
    data_fixtures.write_arrayrecord(str(tmp_path / "train-00000-of-00001.array_record"),
                               [encode_record(im, [f"c{i}"]) for i, im in enumerate(images)])
    src = sources.build_source({"source": "arrayrecord", "path": str(tmp_path), "caption_noise": 0.5}, "train")
    assert isinstance(src, noise.NoisyCaptions)
    clone = pickle.loads(pickle.dumps(src))
    assert [clone[i] == src[i] for i in range(2)] == [True, True]


def test_caption_noise_wrapper(tmp_path):
    n = 400
    data_fixtures.write_folder(str(tmp_path), [(f"{i}.jpg", b"x", [f"caption {i}"]) for i in range(n)])
    src = sources.build_source({"source": "folder", "path": str(tmp_path), "caption_noise": 0.3, "seed": 4},
                               "train")
    assert isinstance(src, noise.NoisyCaptions) and abs(src.realised_rate - 0.3) < 0.06
    swapped = [i for i in range(n) if src[i].get("caption_swapped")]
    assert len(swapped) / n == src.realised_rate
    for i in swapped:
        assert src[i]["captions"] != [f"caption {i}"] and src.captions_of(i) == src[i]["captions"]
    order = np.random.default_rng(0).permutation(n)            # independent of the order records are read in
    assert [i for i in order if src[int(i)].get("caption_swapped")] == [i for i in order if i in set(swapped)]
    other = sources.build_source({"source": "folder", "path": str(tmp_path), "caption_noise": 0.3, "seed": 5},
                                 "train")
    assert [i for i in range(n) if other[i].get("caption_swapped")] != swapped
    clean = sources.build_source({"source": "folder", "path": str(tmp_path), "caption_noise": 0.0}, "train")
    assert not isinstance(clean, noise.NoisyCaptions)
    assert noise.swap_partners(1.0, 0, n, np.arange(n)).tolist() != list(range(n))
    assert np.all(noise.swap_partners(1.0, 0, n, np.arange(n)) != np.arange(n))


def test_tfds_field_mapping(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    images = _images(3)

    class SoftalignNested(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "photo": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
                "title": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(3), "validation": self._generate_examples(1)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"photo": io.BytesIO(images[i]), "title": f"title {i}",
                          "captions": {"text": [f"cap {i} a", f"cap {i} b"]}}

    SoftalignNested(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = {"source": "tfds", "name": "softalign_nested", "path": str(tmp_path), "image_field": "photo",
           "caption_field": "captions/text,title", "heldout_split": "validation"}
    src = sources.build_source(cfg, "train")
    rec = src[0]
    assert isinstance(rec["image"], bytes) and len(src) == 3
    i = int(rec["captions"][-1].decode().split()[-1])
    assert rec["captions"] == [f"cap {i} a".encode(), f"cap {i} b".encode(), f"title {i}".encode()]
    assert len(sources.build_source(cfg, "heldout")) == 1
    with pytest.raises(ValueError, match="no feature 'caption'"):
        sources.build_source({**cfg, "caption_field": "caption"}, "train")


def test_tfds_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("tensorflow", reason="tfds.testing.mock_data encodes mock images with TensorFlow, which "
                                             "softalign does not install (the prepared-dataset tests cover tfds)")
    with tfds.testing.mock_data(num_examples=6):
        src = sources.build_source({"source": "tfds", "name": "coco_captions", "caption_field": "captions/text"},
                                   "train")
        assert len(src) == 6 and src[0]["captions"]


def test_converter_cli(tmp_path, capsys):
    images = _images(6)
    data_fixtures.write_folder(str(tmp_path / "in"), [(f"{i}.jpg", im, [f"caption {i}", f"other {i}"])
                                                 for i, im in enumerate(images)],
                          splits={"train": [f"{i}.jpg" for i in range(5)], "val": ["5.jpg"]})
    out = str(tmp_path / "out")
    lines = convert.main(["--source=folder", f"--input={tmp_path / 'in'}", f"--output_dir={out}", "--num_shards=2"])
    assert lines[0].startswith("train: wrote 5 records to 2 shards") and "skipped 0 (none)" in lines[0]
    assert lines[-1].startswith("convert: 6 records written, 0 skipped, 2 split(s)")
    err = capsys.readouterr().err
    assert "[convert train]" in err and "100%" in err
    info = json.load(open(os.path.join(out, "dataset_info.json")))
    assert info["splits"]["train"]["records_per_shard"] == [3, 2] and info["splits"]["val"]["records"] == 1
    src = sources.build_source({"source": "arrayrecord", "path": out}, "train")
    assert [src[i]["key"] for i in range(5)] == [f"{i}.jpg" for i in range(5)]
    assert src[0]["image"] == images[0] and src[0]["captions"] == ["caption 0", "other 0"]  # bytes kept as is
    with pytest.raises(SystemExit):
        convert.main(["--source=folder", f"--input={tmp_path / 'in'}", f"--output_dir={out}"])  # no --overwrite
    convert.main(["--source=folder", f"--input={tmp_path / 'in'}", f"--output_dir={out}", "--overwrite",
                  "--quiet", "--max_side=20", "--splits=train"])
    src = sources.build_source({"source": "arrayrecord", "path": out}, "train")
    assert len(src.paths) == 1                                   # stale shards of the old layout are gone
    from softalign.data import decode
    assert max(decode.decode_image(src[0]["image"]).size) == 20


def test_sample_captions_and_corpus_tokenizer(tmp_path):
    data_fixtures.write_folder(str(tmp_path), [(f"{i}.jpg", b"x", [f"a photo of thing {i}", "", f"thing {i} again"])
                                          for i in range(30)])
    cfg = {"source": "folder", "path": str(tmp_path)}
    captions = sources.sample_captions(cfg, 20)
    assert len(captions) == 20 and all(c.strip() for c in captions)
    assert any("29" in c for c in captions)                     # spread over the whole split
    tok = corpus_tokenizer(captions, context_length=16, vocab_size=300)
    assert tok.decode(tok.encode("a photo of thing 3")) == "a photo of thing 3"
    assert read_captions(str(tmp_path / "captions.txt"))[0] == "a photo of thing 0"   # header detected


@pytest.mark.skipif(not os.path.isdir(FLICKR), reason="shared Flickr8k copy not present")
def test_flickr8k_converts_and_feeds_the_pipeline(tmp_path):
    out = str(tmp_path / "f8k")
    lines = convert.main(["--source=folder", f"--input={FLICKR}", f"--output_dir={out}", "--max_records=256",
                          "--num_shards=2", "--quiet"])
    assert lines[0].startswith("train: wrote 256 records") and lines[1].startswith("val: wrote 256 records")
    cfg = pipeline.default_data_config()
    cfg.update(dict(source="arrayrecord", path=out, image_size=64))
    tok = corpus_tokenizer(sources.sample_captions(cfg, 1000), context_length=32, vocab_size=600)
    batch = next(pipeline.make_train_iterator(cfg, tok, global_batch_size=32, seed=0))
    assert batch["image"].shape == (32, 64, 64, 3) and batch["tokens"].shape == (32, 32)
    ev = pipeline.make_eval_split(cfg, tok)
    assert ev["image"].shape == (256, 64, 64, 3) and len(ev["caption"][0]) > 5
    assert isinstance(tok, Tokenizer)
