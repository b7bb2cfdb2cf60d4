"""The text_embedding field: record round trip, converter, pipeline batches, bad input skipped or refused."""

import json
import os

import ml_collections
import msgpack
import numpy as np
import pytest

from softalign.data import arrayrecord, convert, decode, pipeline, skips, text_embedding
from softalign.data.arrayrecord import ArrayRecordSource
from softalign.data.tokenizer import synthetic_tokenizer

K, D = 2, 6


def _image(i):
    rng = np.random.default_rng(i)
    return rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)


class ListSource:
    """An in-memory source of raw records with decoded images."""

    def __init__(self, n):
        self.records = [{"image": _image(i), "captions": [f"a red circle number {i}"], "index": i}
                        for i in range(n)]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return dict(self.records[i])


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_record_round_trip(dtype):
    emb = np.random.default_rng(0).normal(size=(K, D)).astype(dtype)
    record = arrayrecord.decode_record(arrayrecord.encode_record(b"img", ["cap"], text_emb=emb))
    assert record[text_embedding.FIELD]["dtype"] == np.dtype(dtype).name
    got = text_embedding.read(record, (K, D))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, emb.astype(np.float32))


def test_old_records_still_read_and_are_skipped_only_when_needed():
    image = _image(0)
    old = arrayrecord.decode_record(arrayrecord.encode_record(b"", ["cap"]))
    assert text_embedding.FIELD not in old
    raw = {"image": image, "captions": ["a cap"], "index": 3}
    assert text_embedding.FIELD not in decode.prepare(raw)               # not asked for: ignored
    skipped = decode.prepare(raw, text_embedding_shape=(K, D))
    assert isinstance(skipped, skips.Skipped) and skipped.reason == skips.BAD_TEXT_EMBEDDING


@pytest.mark.parametrize("bad", [
    np.full((K, D), np.nan, np.float32),                                   # NaN
    np.zeros((K + 1, D), np.float32),                                      # another K
    np.zeros((K, D + 1), np.float16),                                      # another width
    {"dtype": "float32", "shape": [K, D], "data": b"\0" * 7},              # bytes do not match the shape
    {"dtype": "int8", "shape": [K, D], "data": b"\0" * (K * D)},           # not a float
])
def test_bad_embeddings_are_counted_skips(bad):
    raw = {"image": _image(1), "captions": ["cap"], "index": 0, text_embedding.FIELD: bad}
    out = decode.prepare(raw, text_embedding_shape=(K, D))
    assert isinstance(out, skips.Skipped) and out.reason == skips.BAD_TEXT_EMBEDDING


def test_pack_refuses_bad_arrays():
    with pytest.raises(ValueError, match="NaN"):
        text_embedding.pack(np.array([[np.nan]], np.float32))
    with pytest.raises(ValueError, match="dtype"):
        text_embedding.pack(np.zeros((1, 2), np.int32))
    with pytest.raises(ValueError, match=r"\(K, D_in\)"):
        text_embedding.pack(np.zeros((3,), np.float32))


def _convert(tmp_path, n=24, table=None, split="train", num_shards=2):
    source = ListSource(n)
    if table is None:
        table = np.random.default_rng(1).normal(size=(n, K, D)).astype(np.float16)
    result = convert.convert_split(source, str(tmp_path), split, num_shards=num_shards, num_threads=1,
                                   show_progress=False, text_embeddings=table)
    return result, table


def test_converter_attaches_rows_and_skips_non_finite(tmp_path):
    table = np.random.default_rng(1).normal(size=(24, K, D)).astype(np.float32)
    table[5, 1, 2] = np.inf
    result, _ = _convert(tmp_path, table=table)
    assert result["records"] == 23 and result["skipped"] == {skips.BAD_TEXT_EMBEDDING: 1}
    assert result["text_embedding_shape"] == [K, D]
    paths = sorted(os.path.join(tmp_path, p) for p in os.listdir(tmp_path) if p.endswith(arrayrecord.EXTENSION))
    source = ArrayRecordSource(paths)
    kept = [i for i in range(24) if i != 5]                               # order kept, record 5 left out
    for position, i in enumerate(kept):
        element = decode.prepare(source[position], text_embedding_shape=(K, D))
        np.testing.assert_array_equal(element[text_embedding.FIELD], table[i])
        assert element["captions"] == [f"a red circle number {i}"]


def test_converter_refuses_a_bad_table(tmp_path):
    with pytest.raises(ValueError, match="cover 3 records"):
        _convert(tmp_path, n=4, table=np.zeros((3, K, D), np.float32))
    with pytest.raises(ValueError, match=r"\(N, K, D_in\)"):
        _convert(tmp_path, n=4, table=np.zeros((4, D), np.float32))


def test_converter_cli_reads_a_npy(tmp_path):
    from PIL import Image

    folder = tmp_path / "in"
    (folder / "images").mkdir(parents=True)
    rows = ["image,caption"]
    for i in range(6):
        Image.fromarray(np.repeat(np.repeat(_image(i), 5, 0), 5, 1)).save(folder / "images" / f"{i}.png")
        rows.append(f"{i}.png,caption {i}")
    (folder / "captions.txt").write_text("\n".join(rows) + "\n")
    table = np.random.default_rng(3).normal(size=(6, K, D)).astype(np.float16)
    np.save(tmp_path / "emb-train.npy", table)
    out = tmp_path / "out"
    convert.main(["--source=folder", f"--input={folder}", f"--output_dir={out}", "--splits=train", "--quiet",
                  f"--text_embeddings={tmp_path}/emb-{{split}}.npy"])
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["splits"]["train"]["records"] == 6
    assert info["splits"]["train"]["text_embedding_shape"] == [K, D]
    source = ArrayRecordSource([str(out / arrayrecord.shard_name("train", 0, 1))])
    for i in range(6):
        record = source[i]
        np.testing.assert_array_equal(text_embedding.read(record, (K, D)), table[i].astype(np.float32))


def test_pipeline_batches_embeddings_and_skips_records_without(tmp_path):
    n, batch = 32, 8
    source = ListSource(n)
    table = np.random.default_rng(2).normal(size=(n, K, D)).astype(np.float16)
    table[3] = np.nan                                                     # dropped by the converter
    convert.convert_split(source, str(tmp_path), "train", num_shards=1, num_threads=1, show_progress=False,
                          text_embeddings=table)
    # a second shard of old records (no text_embedding): read, then skipped as bad_text_embedding in training
    (tmp_path / "old").mkdir()
    convert.convert_split(ListSource(4), str(tmp_path / "old"), "train", num_shards=1, num_threads=1,
                          show_progress=False)
    os.replace(tmp_path / "old" / arrayrecord.shard_name("train", 0, 1), tmp_path / "train-zzold.array_record")
    skips.reset()
    data = pipeline.default_data_config()
    data.update(source="arrayrecord", path=f"{tmp_path}/train-*.array_record", image_size=8, num_threads=0,
                prefetch_buffer_size=1, batch_prefetch=0)
    data.text_embedding_shape = (K, D)
    tok = synthetic_tokenizer(16, vocab_size=300, num_captions=200)
    it = pipeline.make_train_iterator(data, tok, global_batch_size=batch, seed=0)
    seen = set()
    for _ in range(5):                                                     # > one epoch of the 35 records
        b = next(it)
        assert b[pipeline.TEXT_EMBEDDING].shape == (batch, K, D) and b[pipeline.TEXT_EMBEDDING].dtype == np.float32
        assert np.all(np.isfinite(b[pipeline.TEXT_EMBEDDING]))
        seen.update(int(i) for i in b["index"])
    assert skips.skipped().get(skips.BAD_TEXT_EMBEDDING, 0) >= 1
    assert all(i < n - 1 for i in seen)                                    # the old shard's records never served


def test_eval_arrays_carry_embeddings(tmp_path):
    _convert(tmp_path, n=10, split="val", num_shards=1)
    source = ArrayRecordSource([os.path.join(tmp_path, arrayrecord.shard_name("val", 0, 1))])
    tok = synthetic_tokenizer(16, vocab_size=300, num_captions=200)
    arrays = pipeline.make_eval_arrays(source, tok, 8, text_embedding_shape=(K, D))
    assert arrays[pipeline.TEXT_EMBEDDING].shape == (10, K, D)
    assert pipeline.TEXT_EMBEDDING not in pipeline.make_eval_arrays(source, tok, 8)


def test_raw_msgpack_map_is_what_the_docs_say():
    emb = np.arange(K * D, dtype=np.float16).reshape(K, D)
    record = msgpack.unpackb(arrayrecord.encode_record(b"x", "c", text_emb=emb), raw=False)
    field = record["text_embedding"]
    assert field["shape"] == [K, D] and field["dtype"] == "float16"
    np.testing.assert_array_equal(np.frombuffer(field["data"], "<f2").reshape(K, D), emb)
    assert isinstance(ml_collections.ConfigDict(pipeline.default_data_config()).text_embedding_shape, tuple)
