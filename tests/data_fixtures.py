"""Small on-disk datasets for tests and benchmarks: natural-looking JPEGs, bad records of every kind, and writers
for each supported format (folder, img2dataset tar shards, ArrayRecord). Nothing here is used in training."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from softalign.data import skips


def _field(rng: np.random.Generator, cells: int, width: int, height: int, channels: int) -> np.ndarray:
    grid = rng.normal(0.0, 1.0, (max(2, cells * height // width), cells, channels)).astype(np.float32)
    return np.stack([np.asarray(Image.fromarray(grid[..., c], "F").resize((width, height), Image.BICUBIC))
                     for c in range(channels)], axis=-1)


def natural_image(rng: np.random.Generator, width: int = 400, height: int = 300) -> np.ndarray:
    """uint8 (height, width, 3) with photo-like statistics: smooth luminance at several scales, weak low-frequency
    colour, a few sharp-edged objects and sensor grain (about 30 kB as a quality-90 JPEG at 400x300)."""
    from PIL import ImageDraw
    lum = sum(a * _field(rng, c, width, height, 1) for c, a in ((3, 45.0), (10, 22.0), (40, 10.0), (120, 6.0)))
    base = rng.uniform(70, 170, 3).astype(np.float32)
    out = base + lum + 25.0 * _field(rng, 3, width, height, 3)
    canvas = Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = rng.uniform(-0.2, 0.9) * width, rng.uniform(-0.2, 0.9) * height
        w, h = rng.uniform(0.1, 0.5) * width, rng.uniform(0.1, 0.5) * height
        colour = tuple(int(v) for v in rng.integers(20, 235, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x0 + w, y0 + h), fill=colour)
    out = np.asarray(canvas, np.float32) + 0.6 * lum + rng.normal(0.0, 4.0, (height, width, 3)).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def encode(image: np.ndarray | Image.Image, fmt: str = "JPEG", **options: Any) -> bytes:
    buffer = io.BytesIO()
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    pil.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" and not options else options))
    return buffer.getvalue()


def jpeg(rng: np.random.Generator, width: int = 64, height: int = 48, quality: int = 90) -> bytes:
    return encode(natural_image(rng, width, height), "JPEG", quality=quality)


def bomb_jpeg(side: int = 60_000) -> bytes:
    """A tiny JPEG whose header claims side x side pixels (a decompression bomb)."""
    data = bytearray(encode(Image.new("RGB", (16, 16)), "JPEG", quality=50))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = side.to_bytes(2, "big") + side.to_bytes(2, "big")
    return bytes(data)


def bad_images(rng: np.random.Generator) -> dict[str, bytes]:
    """{reason: image bytes} for each kind of unusable image."""
    good = jpeg(rng, 64, 48)
    return {
        skips.TRUNCATED_IMAGE: good[: len(good) // 2],
        skips.EMPTY_IMAGE: b"",
        skips.NOT_AN_IMAGE: b"<html><body>404 Not Found</body></html>\n",
        skips.DECOMPRESSION_BOMB: bomb_jpeg(),
    }


BAD_CAPTIONS: dict[str, bytes] = {
    skips.EMPTY_CAPTION: b"",
    skips.WHITESPACE_CAPTION: b" \t\n  ",
    skips.CAPTION_NOT_UTF8: b"a caf\xe9 in latin-1 \xff\xfe",
}


def long_caption(num_chars: int = 100_000) -> str:
    """A caption of `num_chars` characters (100 kB by default): words repeated, cut at the end."""
    sentence = "a dog runs along the beach near the water while people watch from the sand "
    return (sentence * (num_chars // len(sentence) + 1))[:num_chars].strip()


def write_tar(path: str, members: Sequence[tuple[str, bytes]]) -> None:
    """An uncompressed tar with the given (name, data) members, in order (img2dataset layout)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))


def write_arrayrecord(path: str, records: Sequence[bytes]) -> None:
    from array_record.python import array_record_module

    from softalign.data.arrayrecord import WRITER_OPTIONS
    writer = array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS)
    for record in records:
        writer.write(record)
    writer.close()


def write_folder(root: str, items: Sequence[tuple[str, bytes | None, Sequence[bytes | str]]],
                 splits: dict[str, list[str]] | None = None) -> None:
    """Flickr8k layout: images/<name> (None: file absent), captions.txt CSV (image,caption), splits.json.
    Captions may be bytes (written raw, so invalid UTF-8 stays invalid)."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    lines = [b"image,caption"]
    for name, data, captions in items:
        if data is not None:
            with open(os.path.join(root, "images", name), "wb") as f:
                f.write(data)
        for caption in captions:
            raw = caption.encode("utf-8") if isinstance(caption, str) else caption
            quoted = b'"' + raw.replace(b'"', b'""') + b'"' if (b"," in raw or b"\n" in raw or not raw.strip()) \
                else raw
            lines.append(name.encode() + b"," + quoted)
    with open(os.path.join(root, "captions.txt"), "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    if splits is not None:
        with open(os.path.join(root, "splits.json"), "w", encoding="utf-8") as f:
            json.dump(splits, f)


def corrupt_record_in_place(path: str, marker: bytes) -> None:
    """Flips bytes inside the ArrayRecord chunk that contains `marker` (its checksum then fails)."""
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        at = data.find(marker)
        if at < 0:
            raise ValueError("marker not found")
        for k in range(at, at + len(marker)):
            data[k] ^= 0x5A
        f.seek(0)
        f.write(bytes(data))
