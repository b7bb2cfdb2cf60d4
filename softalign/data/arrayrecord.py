"""The 'arrayrecord' source and softalign's ArrayRecord record format.

Record format (version 1): each ArrayRecord record is one msgpack map
    {"v": 1, "image": <bin: encoded image bytes, as downloaded>, "captions": [<str>, ...],
     "key": <str, optional>, "meta": <map, optional>,
     "text_embedding": <map, optional: {"dtype": "float16"|"float32", "shape": [K, D_in], "data": <bin>}>}
Readers also accept "caption" (one str) instead of "captions", and captions stored as bin (checked as UTF-8 when
read). ``text_embedding`` (softalign.data.text_embedding) is optional: readers that predate it ignore it, and
records without it still read (a run that needs it skips them as ``bad_text_embedding``). Shards are written
with ``group_size:1`` (one record per chunk: O(1) random access) and no compression (JPEG does not compress).
Shard names: ``<split>-<k:05d>-of-<n:05d>.array_record``.

Shard problems are skipped and counted (`softalign.data.skips`): a shard that cannot be opened is left out
(``corrupt_shard``, once per shard, with a warning); a record that fails its checksum or does not parse comes out
as a ``corrupt_record`` skip when read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import msgpack
from absl import logging
from array_record.python import array_record_module

from softalign.data import skips, text_embedding
from softalign.data.registry import register_source, resolve_split, shard_paths

FORMAT_VERSION = 1
WRITER_OPTIONS = "group_size:1,uncompressed"
EXTENSION = ".array_record"


def encode_record(image: bytes, captions: Sequence[str] | str, key: str = "",
                  meta: dict[str, Any] | None = None, text_emb: Any = None) -> bytes:
    """Serialises one example in format version 1; `text_emb`: an optional (K, D_in) float16/float32 array."""
    if isinstance(captions, (str, bytes)):
        captions = [captions]
    record: dict[str, Any] = {"v": FORMAT_VERSION, "image": bytes(image), "captions": list(captions)}
    if key:
        record["key"] = str(key)
    if meta:
        record["meta"] = meta
    if text_emb is not None:
        record[text_embedding.FIELD] = text_embedding.pack(text_emb)
    return msgpack.packb(record, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
    """Parses one record into a raw record (see softalign.data.decode); raises ValueError when it cannot."""
    try:
        record = msgpack.unpackb(data, raw=False, unicode_errors="surrogateescape", strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ValueError(f"not a msgpack record: {e}") from None
    if not isinstance(record, dict) or "image" not in record:
        raise ValueError("record is not a map with an 'image' entry")
    version = record.get("v", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise ValueError(f"record format version {version} (this code reads {FORMAT_VERSION})")
    return record


def shard_name(split: str, shard: int, num_shards: int) -> str:
    return f"{split}-{shard:05d}-of-{num_shards:05d}{EXTENSION}"


def open_shards(paths: Sequence[str]) -> tuple[list[str], list[int], int]:
    """(readable shards, their record counts, number of unreadable shards); unreadable ones are logged and
    counted once per process as corrupt_shard."""
    good, sizes, bad = [], [], 0
    for path in paths:
        reader = None
        try:
            reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0")
            ok, n = reader.ok(), reader.num_records()
        except Exception as e:  # a shard we cannot open must not stop training
            ok, n = False, 0
            logging.warning("ArrayRecord shard %s cannot be opened: %s", path, e)
        finally:
            if reader is not None:
                try:
                    reader.close()
                except Exception:  # closing a reader of a broken file reports the breakage again
                    pass
        if not ok:
            bad += 1
            if skips.count_once(f"arrayrecord:{path}", skips.CORRUPT_SHARD):
                logging.warning("Skipping corrupt ArrayRecord shard %s (counted as data/skipped/%s)",
                                path, skips.CORRUPT_SHARD)
            continue
        if n:
            good.append(path)
            sizes.append(n)
    return good, sizes, bad


class ArrayRecordSource:
    """Random-access source over ArrayRecord shards in softalign's record format (global index = shard order)."""

    def __init__(self, paths: Sequence[str]):
        self.paths, self.sizes, bad = open_shards(list(paths))
        self.index_skips = {skips.CORRUPT_SHARD: bad} if bad else {}   # found while opening (not per read)
        self._data = grain.sources.ArrayRecordDataSource(self.paths) if self.paths else None

    def __len__(self) -> int:
        return sum(self.sizes)

    def _read(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        try:
            data = self._data[index]
        except Exception as e:  # checksum mismatch, short read, ...
            logging.log_every_n_seconds(logging.WARNING, "Corrupt ArrayRecord record %d: %s", 60, index, e)
            return {"index": index, "_skip": skips.CORRUPT_RECORD}
        try:
            record = decode_record(data)
        except ValueError as e:
            logging.log_every_n_seconds(logging.WARNING, "Unparsable record %d: %s", 60, index, e)
            return {"index": index, "_skip": skips.CORRUPT_RECORD}
        record["index"] = index
        return record

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._read(index)

    def captions_of(self, index: int) -> list[Any]:
        record = self._read(index)
        if "captions" in record:
            return list(record["captions"] or [])
        return [record["caption"]] if record.get("caption") is not None else []

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.paths)} shards, {len(self)} records)"


@register_source("arrayrecord")
def _build_arrayrecord(data_config: Any, split: str) -> ArrayRecordSource:
    """data.path: a folder of ``<split>-*.array_record`` shards, a glob or a comma-separated list ('{split}' is
    replaced by the split name)."""
    name = resolve_split(data_config, split)
    paths = shard_paths(str(data_config.get("path", "") or ""), name, EXTENSION, train=split == "train")
    source = ArrayRecordSource(paths)
    if len(source) == 0:
        raise ValueError(f"arrayrecord: no readable records for split {name!r} in {paths}")
    return source
