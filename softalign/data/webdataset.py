"""The 'webdataset' source: random access into img2dataset-style tar shards, without extracting them.

A shard (``00000.tar``) holds members ``<key>.<ext>``: an image (jpg/jpeg/png/webp), ``txt`` (the caption) and
optionally ``json``. The key is the member path up to the first dot of its file name. Each shard is indexed once
by reading its tar headers (member offsets and sizes); the index is cached beside the shard as
``<shard>.index.json`` (rebuilt when the shard's size or mtime changes) or kept in memory when the folder is
read-only. Records are then read with ``os.pread`` at the recorded offsets.

Index-time problems are skipped and counted once per shard and process: a key without ``.txt`` is
``missing_caption``, one without an image is ``missing_image``; a truncated shard keeps every complete record
before the cut and counts the records lost at the cut (at least one per truncated shard) as ``truncated_shard``.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import json
import os
import tarfile
import threading
from collections.abc import Sequence
from typing import Any

from absl import logging

from softalign.data import skips
from softalign.data.decode import IMAGE_EXTENSIONS
from softalign.data.registry import register_source, resolve_split, shard_paths

INDEX_VERSION = 1
INDEX_SUFFIX = ".index.json"
CAPTION_EXT = "txt"


def _split_name(name: str) -> tuple[str, str]:
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'); the extension is everything after the first dot."""
    folder, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def scan_tar(path: str) -> dict[str, Any]:
    """Reads a tar's headers (not its data) into an index: records [key, img_ext, img_off, img_len, txt_off,
    txt_len], skip counts and whether the file is truncated."""
    size = os.path.getsize(path)
    members: dict[str, dict[str, tuple[int, int]]] = {}
    order: list[str] = []
    cut: set[str] = set()
    truncated = False
    end = 0
    try:
        with tarfile.open(path, "r:") as tar:
            while True:
                try:
                    info = tar.next()
                except (tarfile.ReadError, EOFError, OSError) as e:
                    truncated, end = True, max(end, tar.offset)
                    logging.warning("tar shard %s: unreadable after byte %d (%s)", path, tar.offset, e)
                    break
                if info is None:
                    end = tar.offset
                    break
                if not info.isfile():
                    continue
                key, ext = _split_name(info.name)
                if key not in members:
                    members[key] = {}
                    order.append(key)
                if info.offset_data + info.size > size:
                    cut.add(key)
                    truncated = True
                    continue
                members[key][ext] = (info.offset_data, info.size)
    except (tarfile.ReadError, EOFError, OSError) as e:   # not even one header
        logging.warning("tar shard %s cannot be read: %s", path, e)
        truncated = True
    if not truncated and size < end + 1024:                # the two zero blocks ending an archive are missing
        truncated = True
    lost = set(cut)
    if truncated and order:
        last = members[order[-1]]
        if CAPTION_EXT not in last or not any(ext in last for ext in IMAGE_EXTENSIONS):
            lost.add(order[-1])
    records, counts = [], {}
    for key in order:
        if key in lost:
            continue
        found = members[key]
        image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in found), None)
        reason = skips.MISSING_IMAGE if image_ext is None else (
            skips.MISSING_CAPTION if CAPTION_EXT not in found else None)
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
            continue
        records.append([key, image_ext, *found[image_ext], *found[CAPTION_EXT]])
    if truncated:
        counts[skips.TRUNCATED_SHARD] = max(1, len(lost))
    return {"version": INDEX_VERSION, "size": size, "mtime_ns": os.stat(path).st_mtime_ns,
            "records": records, "skipped": counts, "truncated": truncated}


def load_index(path: str) -> dict[str, Any]:
    """The shard's cached index if still valid, else a fresh scan (written beside the shard when possible)."""
    cache = path + INDEX_SUFFIX
    stat = os.stat(path)
    try:
        with open(cache, encoding="utf-8") as f:
            index = json.load(f)
        if (index.get("version") == INDEX_VERSION and index.get("size") == stat.st_size
                and index.get("mtime_ns") == stat.st_mtime_ns):
            return index
    except (OSError, ValueError):
        pass
    index = scan_tar(path)
    tmp = f"{cache}.tmp{os.getpid()}.{threading.get_ident()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(index, f, separators=(",", ":"))
        os.replace(tmp, cache)            # atomic: concurrent writers (several hosts) are harmless
    except OSError:                       # read-only folder: keep the index in memory
        try:
            os.remove(tmp)
        except OSError:
            pass
    return index


class WebDatasetSource:
    """Random-access source over indexed tar shards (global index = shard order, then member order)."""

    def __init__(self, paths: Sequence[str], num_threads: int = 8):
        self.paths = list(paths)
        with concurrent.futures.ThreadPoolExecutor(max(1, min(num_threads, len(self.paths)))) as pool:
            indices = list(pool.map(load_index, self.paths))
        self._records: list[list[Any]] = []
        self._starts: list[int] = []
        self.index_skips: dict[str, int] = {}      # found while indexing (not per read)
        for path, index in zip(self.paths, indices):
            self._starts.append(sum(len(r) for r in self._records))
            self._records.append(index["records"])
            for reason, n in index["skipped"].items():
                self.index_skips[reason] = self.index_skips.get(reason, 0) + n
                if skips.count_once(f"webdataset:{path}:{reason}", reason, n):
                    logging.warning("webdataset shard %s: %d records skipped (%s)", path, n, reason)
        self._len = sum(len(r) for r in self._records)
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._len

    def __getstate__(self) -> dict[str, Any]:   # file descriptors do not travel to worker processes
        state = dict(self.__dict__)
        state["_fds"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            with self._lock:
                fd = self._fds.get(shard)
                if fd is None:
                    fd = os.open(self.paths[shard], os.O_RDONLY)
                    self._fds[shard] = fd
        return fd

    def _locate(self, index: int) -> tuple[int, list[Any]]:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} records")
        shard = bisect.bisect_right(self._starts, index) - 1
        while not self._records[shard] or index - self._starts[shard] >= len(self._records[shard]):
            shard += 1                       # skip shards with no records
        return shard, self._records[shard][index - self._starts[shard]]

    def _pread(self, shard: int, offset: int, length: int) -> bytes:
        data = os.pread(self._fd(shard), length, offset)
        if len(data) != length:
            raise OSError(f"short read in {self.paths[shard]} at {offset}")
        return data

    def captions_of(self, index: int) -> list[bytes]:
        shard, (_, _, _, _, txt_off, txt_len) = self._locate(index)
        return [self._pread(shard, txt_off, txt_len)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, (key, _, img_off, img_len, txt_off, txt_len) = self._locate(index)
        record: dict[str, Any] = {"key": key, "index": int(index)}
        try:
            record["image"] = self._pread(shard, img_off, img_len)
            record["captions"] = [self._pread(shard, txt_off, txt_len)]
        except OSError:                       # the file changed under us
            record["_skip"] = skips.TRUNCATED_SHARD
        return record

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __repr__(self) -> str:
        return f"WebDatasetSource({len(self.paths)} shards, {len(self)} records)"


@register_source("webdataset")
def _build_webdataset(data_config: Any, split: str) -> WebDatasetSource:
    """data.path: a folder of .tar shards (its ``<split>-*.tar``, ``<split>/*.tar``, or for train all ``*.tar``),
    a glob or a comma-separated list ('{split}' is replaced by the split name)."""
    name = resolve_split(data_config, split)
    source = WebDatasetSource(shard_paths(str(data_config.get("path", "") or ""), name, ".tar",
                                          train=split == "train"))
    if len(source) == 0:
        raise ValueError(f"webdataset: no usable records for split {name!r} in {data_config.get('path')}")
    return source
