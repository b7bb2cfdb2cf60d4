"""Converts a captioned-image dataset into softalign ArrayRecord shards (the format in softalign.data.arrayrecord).

    python -m softalign.data.convert --source=folder --input=../shared/data/flickr8k --output_dir=/data/f8k-ar
    python -m softalign.data.convert --source=webdataset --input='/data/cc3m/*.tar' --output_dir=... --num_shards=64
    python -m softalign.data.convert --source=tfds --input=coco_captions --data_dir=~/tensorflow_datasets \\
        --caption_field=captions/text --splits=train,val --output_dir=...

Every record is validated the way training validates it (captions checked, image fully decoded, pixel limit);
bad records are left out and counted by reason. Good images keep their original bytes (no re-encoding) unless
``--max_side`` asks to shrink larger ones; ``--text_embeddings`` attaches record i's row of an (N, K, D_in)
float16/float32 .npy as its ``text_embedding`` (a non-finite row is a ``bad_text_embedding`` skip);
decoded arrays (e.g. from TFDS) are stored as JPEG (quality 95).
Record i of the input lands in shard ``i * num_shards // n``, so the output keeps the input order. Shards are
written under temporary names and renamed when complete. The command ends with one summary line per split and
writes ``dataset_info.json`` (counts, skip reasons, shard list) to the output folder.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from softalign.data import arrayrecord, decode, skips, text_embedding
from softalign.data.skips import BadRecord
from softalign.data.sources import build_source

RECORDS_PER_SHARD = 10_000      # --num_shards=0 picks ceil(n / this)


class Progress:
    """A one-line progress bar on stderr (a line per 10% when stderr is not a terminal)."""

    def __init__(self, total: int, label: str, stream: Any = None):
        self.total, self.label = max(int(total), 1), label
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = self.last = time.perf_counter()
        self.done = 0
        self.next_decile = 1

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.tty and (now - self.last > 0.2 or self.done >= self.total):
            self.last = now
            self.stream.write("\r" + self._line(now))
            self.stream.flush()
        elif not self.tty and self.done * 10 >= self.next_decile * self.total:
            while self.done * 10 >= self.next_decile * self.total:
                self.next_decile += 1
            self.stream.write(self._line(now) + "\n")
            self.stream.flush()

    def _line(self, now: float) -> str:
        frac = min(self.done / self.total, 1.0)
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        bar = "#" * int(frac * 30)
        return (f"[{self.label}] |{bar:<30}| {self.done}/{self.total} {frac:4.0%} "
                f"{rate:,.0f} rec/s ETA {int(eta) // 60}:{int(eta) % 60:02d}")

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _encode_array(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(decode.array_to_rgb(image)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def validate_record(raw: dict[str, Any], *, pixel_limit: int, max_side: int = 0, text_emb: Any = None
                    ) -> tuple[bytes | None, str, dict[str, int]]:
    """(serialised record or None, skip reason or '', dropped-caption counts) for one raw record; `text_emb`: its
    (K, D_in) text embeddings to store."""
    if raw.get("_skip"):
        return None, str(raw["_skip"]), {}
    if text_emb is not None:
        try:
            text_emb = text_embedding.check_array(text_emb)
        except ValueError:
            return None, skips.BAD_TEXT_EMBEDDING, {}
    try:
        captions, dropped = decode.check_captions(decode.raw_captions(raw))
        image = raw.get("image")
        if isinstance(image, np.ndarray) and image.dtype != object and image.ndim >= 2:
            decode.load_image(image, pixel_limit=pixel_limit)     # checks shape and pixel limit
            data = _encode_array(image)
        else:
            if isinstance(image, np.ndarray):
                image = image.item()
            if image is None:
                raise BadRecord(skips.MISSING_IMAGE)
            data = bytes(image)
            decoded = decode.decode_image(data, min_size=None if max_side else 64, pixel_limit=pixel_limit)
            if max_side and max(decoded.size) > max_side:
                decoded.thumbnail((max_side, max_side), Image.BICUBIC)
                buffer = io.BytesIO()
                decoded.save(buffer, "JPEG", quality=95)
                data = buffer.getvalue()
    except BadRecord as e:
        return None, e.reason, {}
    key = raw.get("key", "")
    return arrayrecord.encode_record(data, captions, key=str(key) if key is not None else "",
                                     text_emb=text_emb), "", dropped


def _shard_paths(output_dir: str, split: str, num_shards: int) -> list[str]:
    return [os.path.join(output_dir, arrayrecord.shard_name(split, k, num_shards)) for k in range(num_shards)]


def convert_split(source: Any, output_dir: str, split: str, *, num_shards: int = 0, num_threads: int = 8,
                  pixel_limit: int = decode.DEFAULT_PIXEL_LIMIT, max_side: int = 0, max_records: int = 0,
                  show_progress: bool = True, text_embeddings: Any = None) -> dict[str, Any]:
    """Writes `source` (its first `max_records` records when > 0) as ``<split>-*-of-*.array_record`` in
    `output_dir`; returns the split's summary. `text_embeddings` (N, K, D_in): row i becomes record i's
    text_embedding (ValueError up front when it is not such an array or has fewer rows than records)."""
    from array_record.python import array_record_module

    n = len(source) if max_records <= 0 else min(len(source), max_records)
    if text_embeddings is not None:
        text_embeddings = text_embedding.check_table(text_embeddings, n)
    num_shards = max(1, min(num_shards or math.ceil(n / RECORDS_PER_SHARD), max(n, 1)))
    paths = _shard_paths(output_dir, split, num_shards)
    writers = [None] * num_shards
    written = [0] * num_shards
    skipped: dict[str, int] = {}
    dropped: dict[str, int] = {}
    progress = Progress(n, f"convert {split}") if show_progress else None

    def work(i: int) -> tuple[bytes | None, str, dict[str, int]]:
        try:
            raw = source[i]
        except Exception:  # an unreadable input record must not stop the conversion
            return None, skips.CORRUPT_RECORD, {}
        return validate_record(raw, pixel_limit=pixel_limit, max_side=max_side,
                               text_emb=None if text_embeddings is None else text_embeddings[i])

    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
            for block in range(0, n, 512):
                indices = range(block, min(n, block + 512))
                for i, (data, reason, drops) in zip(indices, pool.map(work, indices)):
                    if data is None:
                        skipped[reason] = skipped.get(reason, 0) + 1
                    else:
                        shard = i * num_shards // n
                        if writers[shard] is None:
                            writers[shard] = array_record_module.ArrayRecordWriter(
                                paths[shard] + ".tmp", arrayrecord.WRITER_OPTIONS)
                        writers[shard].write(data)
                        written[shard] += 1
                        for key, count in drops.items():
                            dropped[key.split("/", 1)[-1]] = dropped.get(key.split("/", 1)[-1], 0) + count
                    if progress:
                        progress.update()
    finally:
        if progress:
            progress.close()
    for shard, writer in enumerate(writers):
        if writer is None:        # no good record fell in this shard: write an empty but valid shard
            writer = array_record_module.ArrayRecordWriter(paths[shard] + ".tmp", arrayrecord.WRITER_OPTIONS)
        writer.close()
        os.replace(paths[shard] + ".tmp", paths[shard])
    return {"records": sum(written), "skipped": dict(sorted(skipped.items())),
            "dropped_captions": dict(sorted(dropped.items())),
            "shards": [os.path.basename(p) for p in paths], "records_per_shard": written,
            **({} if text_embeddings is None else {"text_embedding_shape": list(text_embeddings.shape[1:])})}


def default_splits(source: str, path: str) -> list[str]:
    """Every split the input has: splits.json keys / COCO caption files for 'folder', else ['train']."""
    if source == "folder" and os.path.isdir(path):
        splits_json = os.path.join(path, "splits.json")
        if os.path.exists(splits_json):
            with open(splits_json, encoding="utf-8") as f:
                return list(json.load(f))
        import glob
        found = sorted({os.path.basename(p)[len("captions_"):-len(".json")].rstrip("0123456789")
                        for folder in (path, os.path.join(path, "annotations"))
                        for p in glob.glob(os.path.join(folder, "captions_*.json"))})
        if found:
            return found
    return ["train"]


def summary_line(split: str, result: dict[str, Any], output_dir: str) -> str:
    skipped = result["skipped"]
    why = ", ".join(f"{k}: {v}" for k, v in skipped.items()) or "none"
    line = (f"{split}: wrote {result['records']} records to {len(result['shards'])} shards in {output_dir}; "
            f"skipped {sum(skipped.values())} ({why})")
    if result["dropped_captions"]:
        line += "; dropped captions " + ", ".join(f"{k}: {v}" for k, v in result["dropped_captions"].items())
    return line


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(prog="python -m softalign.data.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, choices=("folder", "webdataset", "tfds", "arrayrecord"))
    parser.add_argument("--input", required=True,
                        help="folder (folder), shard folder/glob/list (webdataset, arrayrecord), dataset name (tfds)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--splits", default="", help="comma-separated split names (default: all the input has)")
    parser.add_argument("--num_shards", type=int, default=0,
                        help=f"shards per split (0: one per {RECORDS_PER_SHARD} records)")
    parser.add_argument("--data_dir", default="", help="tfds data_dir")
    parser.add_argument("--image_field", default="image", help="tfds image feature")
    parser.add_argument("--caption_field", default="caption", help="tfds caption feature(s), comma-separated")
    parser.add_argument("--image_dir", default="", help="folder source: images folder if not <input>/images")
    parser.add_argument("--pixel_limit", type=int, default=decode.DEFAULT_PIXEL_LIMIT)
    parser.add_argument("--max_side", type=int, default=0, help="re-encode images whose longer side exceeds this")
    parser.add_argument("--num_threads", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--max_records", type=int, default=0, help="convert only the first N records per split")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards of the same split")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--text_embeddings", default="",
                        help="a .npy (N, K, D_in) of per-record text embeddings, in input order ('{split}' is "
                             "replaced by the split name)")
    args = parser.parse_args(argv)

    os.makedirs(args.output_dir, exist_ok=True)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()] or default_splits(args.source, args.input)
    info_path = os.path.join(args.output_dir, "dataset_info.json")
    info: dict[str, Any] = {}
    if os.path.exists(info_path):
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    info.update({"format": "softalign-arrayrecord", "version": arrayrecord.FORMAT_VERSION,
                 "input": {"source": args.source, "path": args.input}})
    info.setdefault("splits", {})
    lines = []
    for split in splits:
        existing = [p for p in os.listdir(args.output_dir)
                    if p.startswith(f"{split}-") and p.endswith(arrayrecord.EXTENSION)]
        if existing and not args.overwrite:
            parser.error(f"{args.output_dir} already has {split} shards ({existing[0]}, ...); pass --overwrite")
        for name in existing:
            os.remove(os.path.join(args.output_dir, name))
        config = {"source": args.source, "path": args.data_dir if args.source == "tfds" else args.input,
                  "name": args.input if args.source == "tfds" else "", "train_split": split,
                  "image_field": args.image_field, "caption_field": args.caption_field,
                  "image_dir": args.image_dir, "caption_noise": 0.0}
        source = build_source(config, "train")
        index_time = dict(getattr(source, "index_skips", {}))   # e.g. truncated tar shards, corrupt shards
        result = convert_split(source, args.output_dir, split, num_shards=args.num_shards,
                               num_threads=args.num_threads, pixel_limit=args.pixel_limit,
                               max_side=args.max_side, max_records=args.max_records,
                               show_progress=not args.quiet,
                               text_embeddings=np.load(args.text_embeddings.replace("{split}", split), mmap_mode="r")
                               if args.text_embeddings else None)
        for reason, n in index_time.items():    # found while opening the input (e.g. truncated tar shards)
            result["skipped"][reason] = result["skipped"].get(reason, 0) + n
        result["skipped"] = dict(sorted(result["skipped"].items()))
        info["splits"][split] = result
        lines.append(summary_line(split, result, args.output_dir))
        print(lines[-1], flush=True)
    with open(info_path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    total_written = sum(info["splits"][s]["records"] for s in splits)
    total_skipped = sum(sum(info["splits"][s]["skipped"].values()) for s in splits)
    lines.append(f"convert: {total_written} records written, {total_skipped} skipped, "
                 f"{len(splits)} split(s) -> {args.output_dir}")
    print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
