"""Decoding and validation of raw records, shared by the Grain map stage, the eval arrays and the converter.

A *raw record* (what a source's ``__getitem__`` returns) is a dict with
  image     encoded bytes (JPEG/PNG/WebP/...), or an already decoded array (H, W[, C]) of any integer/float dtype
  captions  a list of str/bytes, or caption: one str/bytes
  index     int (position in the source)
  _skip     optional: a reason string when the source already knows the record is unusable (e.g. corrupt)
and optionally ``key``, ``labels``, ``caption_swapped``, ``text_embedding`` (softalign.data.text_embedding).

`prepare` turns it into ``{'image': PIL RGB image or uint8 (H, W, 3), 'captions': [str, ...], 'index', ...}`` or
a `skips.Skipped` marker naming why the record cannot be used. JPEGs are decoded with PIL's draft mode (the DCT
scales by 1/2, 1/4 or 1/8 while decoding) when the caller says how many pixels it actually needs.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from softalign.data import skips, text_embedding
from softalign.data.skips import BadRecord

DEFAULT_PIXEL_LIMIT = 64_000_000
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

# We enforce our own, configurable limit (data.pixel_limit) before decoding; PIL's warning would only be noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: greyscale, palette (with transparency), CMYK, YCbCr, alpha, 1-bit, 16/32-bit, float."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            top = float(arr.max()) if arr.size else 1.0
            arr = arr / (top if top > 1.0 else 1.0) * 255.0
        elif mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr.astype(np.float64) * (255.0 / 65535.0)
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def array_to_rgb(image: np.ndarray) -> np.ndarray:
    """A decoded array (H, W), (H, W, 1|2|3|4) in uint8/uint16/float -> uint8 (H, W, 3)."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4) or min(arr.shape[:2]) < 1:
        raise BadRecord(skips.BAD_IMAGE, f"image array of shape {arr.shape}")
    if arr.shape[-1] in (2, 4):      # drop alpha
        arr = arr[..., :-1]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return (arr >> 8).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        scale = 255.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(arr) * scale, 0, 255).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def open_image(data: bytes, pixel_limit: int = DEFAULT_PIXEL_LIMIT) -> Image.Image:
    """Parses the header only (no pixel decode); raises BadRecord for empty, unknown or oversized images."""
    if data is None:
        raise BadRecord(skips.MISSING_IMAGE)
    if len(data) == 0:
        raise BadRecord(skips.EMPTY_IMAGE)
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadRecord(skips.DECOMPRESSION_BOMB, str(e)) from None
    except UnidentifiedImageError as e:
        raise BadRecord(skips.NOT_AN_IMAGE, str(e)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise BadRecord(_decode_error_reason(e), str(e)) from None
    w, h = img.size
    if pixel_limit and w * h > pixel_limit:
        raise BadRecord(skips.DECOMPRESSION_BOMB, f"{w}x{h} pixels > pixel_limit {pixel_limit}")
    if w < 1 or h < 1:
        raise BadRecord(skips.BAD_IMAGE, f"size {w}x{h}")
    return img


def decode_image(data: bytes, *, min_size: int | None = None,
                 pixel_limit: int = DEFAULT_PIXEL_LIMIT) -> Image.Image:
    """Encoded bytes -> RGB PIL image. With `min_size`, JPEG decoding is downscaled (draft mode) as far as keeps
    both sides >= min_size. Raises BadRecord (truncated, not an image, bomb, ...)."""
    img = open_image(data, pixel_limit)
    try:
        if min_size and img.format == "JPEG":
            img.draft("RGB", (int(min_size), int(min_size)))
        img.load()
        if getattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False) and img.format == "JPEG" \
                and b"\xff\xd9" not in data[-4096:]:
            raise OSError("image file is truncated (no end-of-image marker)")
        return _pil_to_rgb(img)
    except Image.DecompressionBombError as e:
        raise BadRecord(skips.DECOMPRESSION_BOMB, str(e)) from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise BadRecord(_decode_error_reason(e), str(e)) from None


def _decode_error_reason(error: BaseException) -> str:
    message = str(error).lower()
    if isinstance(error, EOFError) or "truncated" in message or "premature" in message:
        return skips.TRUNCATED_IMAGE
    return skips.BAD_IMAGE


def check_caption(caption: Any) -> str:
    """A usable caption as str, or BadRecord (empty, whitespace-only, not UTF-8). Long captions pass: the
    tokenizer truncates them and keeps end-of-text last."""
    if caption is None:
        raise BadRecord(skips.MISSING_CAPTION)
    if isinstance(caption, np.ndarray) and caption.ndim == 0:
        caption = caption.item()
    if isinstance(caption, (bytes, bytearray, memoryview, np.bytes_)):
        try:
            caption = bytes(caption).decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord(skips.CAPTION_NOT_UTF8, str(e)) from None
    caption = str(caption)
    try:
        caption.encode("utf-8")        # lone surrogates (e.g. from surrogateescape) are not UTF-8
    except UnicodeEncodeError as e:
        raise BadRecord(skips.CAPTION_NOT_UTF8, str(e)) from None
    if not caption:
        raise BadRecord(skips.EMPTY_CAPTION)
    if not caption.strip():
        raise BadRecord(skips.WHITESPACE_CAPTION)
    return caption.strip()


def raw_captions(record: dict[str, Any]) -> list[Any]:
    """The record's caption(s) as a list (empty when it has none)."""
    if "captions" in record and record["captions"] is not None:
        value = record["captions"]
    else:
        value = record.get("caption")
    if value is None:
        return []
    if isinstance(value, np.ndarray) and value.ndim > 0:
        return list(value.reshape(-1))
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def check_captions(captions: Sequence[Any]) -> tuple[list[str], dict[str, int]]:
    """Usable captions and ``{'dropped_caption/<reason>': n}`` for the rest; BadRecord if none is usable."""
    good, dropped, first_reason = [], {}, None
    for caption in captions:
        try:
            good.append(check_caption(caption))
        except BadRecord as e:
            first_reason = first_reason or e.reason
            key = f"{skips.DROPPED_CAPTION}/{e.reason}"
            dropped[key] = dropped.get(key, 0) + 1
    if not good:
        raise BadRecord(first_reason or skips.MISSING_CAPTION)
    return good, dropped


def load_image(image: Any, *, min_size: int | None = None,
               pixel_limit: int = DEFAULT_PIXEL_LIMIT) -> Image.Image | np.ndarray:
    """Encoded bytes -> RGB PIL image; decoded array -> uint8 (H, W, 3); PIL image -> RGB PIL image."""
    if image is None:
        raise BadRecord(skips.MISSING_IMAGE)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray) and image.dtype != object and image.ndim >= 2:
        if pixel_limit and image.shape[0] * image.shape[1] > pixel_limit:
            raise BadRecord(skips.DECOMPRESSION_BOMB, f"array {image.shape}")
        return array_to_rgb(image)
    if isinstance(image, np.ndarray):
        image = image.item()
    if isinstance(image, (bytes, bytearray, memoryview, np.bytes_)):
        return decode_image(bytes(image), min_size=min_size, pixel_limit=pixel_limit)
    raise BadRecord(skips.BAD_IMAGE, f"unsupported image value of type {type(image).__name__}")


def prepare(record: dict[str, Any], *, min_size: int | None = None, pixel_limit: int = DEFAULT_PIXEL_LIMIT,
            text_embedding_shape: Sequence[int] = ()) -> dict[str, Any] | skips.Skipped:
    """Raw record -> {'image': RGB PIL image | uint8 (H, W, 3), 'captions': [str, ...], 'index', 'caption_swapped',
    ['labels', 'key', '_skips', 'text_embedding']} or a `Skipped` marker. A non-empty `text_embedding_shape` (K, D_in)
    requires the record's text_embedding (float32 out; a bad one is a ``bad_text_embedding`` skip); () ignores it."""
    index = int(record.get("index", -1))
    if record.get("_skip"):
        return skips.Skipped(str(record["_skip"]), index)
    try:
        captions, dropped = check_captions(raw_captions(record))
        embedding = text_embedding.read(record, text_embedding_shape) if len(text_embedding_shape) else None
        image = load_image(record.get("image"), min_size=min_size, pixel_limit=pixel_limit)
    except BadRecord as e:
        return skips.Skipped(e.reason, index)
    out = {"image": image, "captions": captions, "index": index,
           "caption_swapped": bool(record.get("caption_swapped", False))}
    for key in ("labels", "key"):
        if key in record:
            out[key] = record[key]
    if embedding is not None:
        out[text_embedding.FIELD] = embedding
    if dropped:
        out[skips.ELEMENT_KEY] = dropped
    return out


def image_size(image: Image.Image | np.ndarray) -> tuple[int, int]:
    """(width, height)."""
    if isinstance(image, Image.Image):
        return image.size
    return int(image.shape[1]), int(image.shape[0])


def as_pil(image: Image.Image | np.ndarray) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))


def crop_resize(image: Image.Image | np.ndarray, box: tuple[float, float, float, float], size: int,
                resample: int = Image.BILINEAR) -> np.ndarray:
    """Resample box=(x0, y0, x1, y1) of the image to uint8 (size, size, 3) (antialiased when shrinking)."""
    return np.asarray(as_pil(image).resize((size, size), resample, box=box))


def resize_center(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Resizes the shorter side to `size` and centre-crops to uint8 (size, size, 3); no-op when already that size."""
    w, h = image_size(image)
    if w == size and h == size:
        return np.asarray(image, np.uint8)
    side = min(w, h)
    left, top = (w - side) / 2.0, (h - side) / 2.0
    return crop_resize(image, (left, top, left + side, top + side), size, Image.BICUBIC)


def draft_size(size: int, min_crop_scale: float = 1.0) -> int:
    """Smallest side a decoded image needs so a crop of area fraction `min_crop_scale` still has `size` pixels."""
    return int(math.ceil(size / math.sqrt(max(min_crop_scale, 1e-3))))
