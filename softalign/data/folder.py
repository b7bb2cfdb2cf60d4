"""The 'folder' source: an images folder plus captions, one record per image with all of its captions.

Caption files (looked up in ``data.path``):
  * ``captions.txt`` / ``*.csv``: CSV with a header naming ``image`` and ``caption`` columns (Flickr8k/30k as
    distributed on Kaggle), several rows per image allowed;
  * ``*.token.txt``: the original Flickr ``<image>#<n><TAB><caption>`` lines;
  * COCO ``captions_<split>*.json`` (in the folder or its ``annotations/``): ``images[].file_name`` and
    ``annotations[].{image_id, caption}``; the split comes from the file name.
Splits: ``splits.json`` (``{"train": [image, ...], "val": [...]}``) picks and orders a split's images. Without it
the train split is every captioned image (in caption-file order) and other splits are an error (COCO excepted).
Images: ``data.image_dir`` if set, else ``<path>/images`` (COCO: ``<path>/<split stem>`` such as ``train2017``),
else ``<path>``. Images are read (not decoded) by ``__getitem__``; a missing file is a ``missing_image`` skip,
and an image listed in splits.json without captions is counted once as ``missing_caption``.
"""

from __future__ import annotations

import collections
import csv
import glob
import io
import json
import os
import re
from typing import Any

from absl import logging

from softalign.data import skips
from softalign.data.registry import register_source, resolve_split

CSV_NAMES = ("captions.txt", "captions.csv", "results.csv")


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return f.read()


def read_caption_table(path: str) -> dict[str, list[str]]:
    """{image file: [captions...]} in first-appearance order, from a CSV with image/caption columns or a Flickr
    ``.token.txt`` file. Undecodable bytes survive as surrogates (flagged as caption_not_utf8 when read)."""
    text = _read_text(path)
    table: dict[str, list[str]] = collections.OrderedDict()
    first = text.split("\n", 1)[0]
    if re.match(r"^[^\t,]+#\d+\t", first):                     # Flickr token file: <image>#<n>\t<caption>
        for line in text.splitlines():
            if "\t" not in line:
                continue
            image, caption = line.split("\t", 1)
            table.setdefault(image.split("#", 1)[0].strip(), []).append(caption)
        return table
    delimiter = "|" if first.count("|") > first.count(",") else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, skipinitialspace=True)
    fields = {name.strip().lower(): name for name in reader.fieldnames or ()}
    image_col = fields.get("image") or fields.get("image_name") or fields.get("filename") or fields.get("file")
    caption_col = fields.get("caption") or fields.get("comment") or fields.get("text")
    if image_col is None or caption_col is None:
        raise ValueError(f"{path}: need 'image' and 'caption' columns, found {reader.fieldnames}")
    for row in reader:
        image = (row.get(image_col) or "").strip()
        if image:
            table.setdefault(image, []).append(row.get(caption_col) or "")
    return table


def read_coco_captions(path: str) -> dict[str, list[str]]:
    """{file_name: [captions...]} from a COCO captions json, in the json's image order."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        data = json.load(f)
    names = {image["id"]: image["file_name"] for image in data.get("images", [])}
    table: dict[str, list[str]] = collections.OrderedDict((name, []) for name in names.values())
    for ann in data.get("annotations", []):
        if ann.get("image_id") in names:
            table[names[ann["image_id"]]].append(ann.get("caption", ""))
    return table


class FolderSource:
    """Random-access source over (image file, [captions]) pairs."""

    def __init__(self, items: list[tuple[str, list[str]]], image_dir: str,
                 index_skips: dict[str, int] | None = None):
        self.items, self.image_dir = items, image_dir
        self.index_skips = dict(index_skips or {})   # found while listing (not per read)

    def __len__(self) -> int:
        return len(self.items)

    def captions_of(self, index: int) -> list[str]:
        return list(self.items[int(index)][1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        name, captions = self.items[index]
        record: dict[str, Any] = {"captions": list(captions), "key": name, "index": index}
        try:
            with open(os.path.join(self.image_dir, name), "rb") as f:
                record["image"] = f.read()
        except OSError:
            record["_skip"] = skips.MISSING_IMAGE
        return record

    def __repr__(self) -> str:
        return f"FolderSource({len(self)} images in {self.image_dir})"


def _first_dir(candidates: list[str]) -> str:
    for candidate in candidates:
        if candidate and os.path.isdir(candidate):
            return candidate
    return candidates[-1]


def find_coco_json(root: str, split: str) -> str | None:
    for folder in (root, os.path.join(root, "annotations")):
        found = sorted(glob.glob(os.path.join(folder, f"captions_{split}*.json")))
        if found:
            return found[0]
    return None


def build_folder_source(root: str, split: str, *, image_dir: str = "", train: bool = False) -> FolderSource:
    """The `split` records of a Flickr-style or COCO-style folder (see module docstring)."""
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise ValueError(f"folder source: data.path={root!r} is not a folder")
    coco = find_coco_json(root, split)
    if coco is not None:
        table = read_coco_captions(coco)
        stem = os.path.basename(coco)[len("captions_"):-len(".json")]
        folder = image_dir or _first_dir([os.path.join(root, stem), os.path.join(root, "images", stem),
                                          os.path.join(root, "images"), root])
        return FolderSource(list(table.items()), folder)
    tables = [p for p in (os.path.join(root, n) for n in CSV_NAMES) if os.path.exists(p)]
    tables += sorted(glob.glob(os.path.join(root, "*.token.txt")))
    if not tables:
        raise ValueError(f"folder source: no captions.txt, captions.csv, *.token.txt or captions_{split}*.json "
                         f"in {root}")
    table = read_caption_table(tables[0])
    folder = image_dir or _first_dir([os.path.join(root, "images"), root])
    splits_path = os.path.join(root, "splits.json")
    if os.path.exists(splits_path):
        with open(splits_path, encoding="utf-8") as f:
            splits = json.load(f)
        if split not in splits:
            raise ValueError(f"folder source: split {split!r} not in {splits_path} (has {sorted(splits)})")
        names = list(splits[split])
        uncaptioned = [n for n in names if n not in table]
        if uncaptioned and skips.count_once(f"folder:{splits_path}:{split}", skips.MISSING_CAPTION,
                                            len(uncaptioned)):
            logging.warning("folder source: %d images of split %r have no caption (e.g. %s); skipped",
                            len(uncaptioned), split, uncaptioned[0])
        return FolderSource([(n, table[n]) for n in names if n in table], folder,
                            {skips.MISSING_CAPTION: len(uncaptioned)} if uncaptioned else None)
    if not train:
        raise ValueError(f"folder source: {root} has no splits.json, so it only has a train split "
                         f"(asked for {split!r}); add splits.json or set data.heldout_split / evals")
    return FolderSource(list(table.items()), folder)


@register_source("folder")
def _build_folder(data_config: Any, split: str) -> FolderSource:
    return build_folder_source(str(data_config.get("path", "") or ""), resolve_split(data_config, split),
                               image_dir=str(data_config.get("image_dir", "") or ""), train=split == "train")
