"""Data: sources (synthetic scenes + registry), tokenizer, and the Grain input pipeline.

Names are loaded lazily (PEP 562) so `python -m softalign.data.tokenizer` and light users such as
`softalign.data.synthetic` do not import JAX/Grain.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "pipeline": ("CLIP_MEAN", "CLIP_STD", "data_metrics", "default_data_config", "make_eval_arrays",
                 "make_eval_split", "make_train_dataset", "make_train_iterator", "normalize_images",
                 "to_global_batch"),
    "sources": ("available_sources", "build_source", "register_source", "sample_captions"),
    "synthetic": ("COLORS", "POSITIONS", "SHAPES", "SIZES", "SyntheticScenes", "attribute_classnames",
                  "attribute_prompts", "caption_corpus"),
    "tokenizer": ("Tokenizer", "corpus_tokenizer", "synthetic_tokenizer"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
