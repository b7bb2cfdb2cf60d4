"""The 'tfds' source: ``tfds.data_source(data.name, split, data_dir=data.path)`` (random access, no TensorFlow
needed for ArrayRecord-backed datasets), with a field mapping from the config.

  data.name           TFDS dataset name (with optional config/version, e.g. 'coco_captions/2017')
  data.path           TFDS data_dir ('' for the default); nothing is downloaded (prepare it with ``tfds build``)
  data.image_field    image feature; nested features with '/' (default 'image')
  data.caption_field  caption feature(s): comma-separated, '/' for nesting, e.g. 'captions/text' (default 'caption')

The image feature is read undecoded (``tfds.decode.SkipDecoding``) so our decoder (draft mode, pixel limit, colour
modes) handles it; a decoded array (e.g. from ``tfds.testing.mock_data``) is accepted too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from softalign.data.registry import register_source, resolve_split


def _get_path(record: Any, path: str) -> Any:
    value = record
    for part in path.split("/"):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _flatten(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, np.ndarray):
        return list(value.reshape(-1)) if value.ndim else [value.item()]
    if isinstance(value, (list, tuple)):
        return [item for v in value for item in _flatten(v)]
    return [value]


class TfdsSource:
    """Adapts a TFDS random-access data source to softalign's raw records."""

    def __init__(self, data_source: Any, image_field: str = "image", caption_fields: tuple[str, ...] = ("caption",)):
        self._source = data_source
        self.image_field, self.caption_fields = image_field, tuple(caption_fields)

    def __len__(self) -> int:
        return len(self._source)

    def captions_of(self, index: int) -> list[Any]:
        record = self._source[int(index)]
        return [c for field in self.caption_fields for c in _flatten(_get_path(record, field))]

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        record = self._source[index]
        captions = [c for field in self.caption_fields for c in _flatten(_get_path(record, field))]
        return {"image": _get_path(record, self.image_field), "captions": captions, "index": index}

    def __repr__(self) -> str:
        return f"TfdsSource({self._source!r}, image={self.image_field!r}, captions={self.caption_fields})"


def tfds_source(name: str, split: str, *, data_dir: str = "", image_field: str = "image",
                caption_field: str = "caption") -> TfdsSource:
    """Opens `name`/`split` with tfds.data_source and maps its fields."""
    import tensorflow_datasets as tfds  # optional dependency, imported only when this source is used

    if not name:
        raise ValueError("tfds source: set data.name to the TFDS dataset name, e.g. 'coco_captions'")
    fields = tuple(f.strip() for f in caption_field.split(",") if f.strip())
    if not fields:
        raise ValueError("tfds source: data.caption_field is empty")
    decoders = None
    if "/" not in image_field:
        decoders = {image_field: tfds.decode.SkipDecoding()}
    source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False, decoders=decoders)
    features = getattr(getattr(source, "dataset_info", None), "features", None)
    if features is not None:
        top = set(features.keys())
        for field in (image_field, *fields):
            if field.split("/")[0] not in top:
                raise ValueError(f"tfds source: {name} has no feature {field!r}; features: {sorted(top)}")
    return TfdsSource(source, image_field, fields)


@register_source("tfds")
def _build_tfds(data_config: Any, split: str) -> TfdsSource:
    return tfds_source(str(data_config.get("name", "") or ""), resolve_split(data_config, split),
                       data_dir=str(data_config.get("path", "") or ""),
                       image_field=str(data_config.get("image_field", "image") or "image"),
                       caption_field=str(data_config.get("caption_field", "caption") or "caption"))
