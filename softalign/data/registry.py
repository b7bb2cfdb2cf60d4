"""The data-source registry: ``@register_source(name)`` and the helpers that backends share.

Backends (``arrayrecord``, ``webdataset``, ``folder``, ``tfds_source``) import this module to register themselves;
``sources`` imports the backends and dispatches on ``data.source``. Keeping the registry apart from the dispatcher
means no backend imports the module that imports it.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from typing import Any, Protocol


class Source(Protocol):
    """What the pipeline and evaluators need from a source."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


SourceBuilder = Callable[[Any, str], Source]
# Shard names that belong to an evaluation split: the train split's "every shard" fallback leaves them out.
EVAL_SPLIT_PREFIXES = ("val-", "valid-", "validation-", "test-", "heldout-", "dev-")
_BUILDERS: dict[str, SourceBuilder] = {}


def register_source(name: str) -> Callable[[SourceBuilder], SourceBuilder]:
    """Decorator registering `fn(data_config, split) -> source` under `name`."""

    def decorator(fn: SourceBuilder) -> SourceBuilder:
        if name in _BUILDERS and _BUILDERS[name] is not fn:
            raise ValueError(f"data source {name!r} is already registered")
        _BUILDERS[name] = fn
        return fn

    return decorator


def registered() -> dict[str, SourceBuilder]:
    """The builders registered so far (``sources`` imports every built-in backend first)."""
    return dict(_BUILDERS)


def resolve_split(data_config: Any, split: str) -> str:
    """The dataset's own split name: 'train' -> data.train_split, 'heldout' -> data.heldout_split, else as given."""
    if split == "train":
        return str(data_config.get("train_split", "train") or "train")
    if split == "heldout":
        return str(data_config.get("heldout_split", "val") or "val")
    return split


def shard_paths(pattern: str, split: str, extension: str, *, train: bool = False) -> list[str]:
    """Shard files of `split` named by `pattern`: a folder (its ``<split>-*<extension>`` files, else the files in
    its ``<split>/`` subfolder, else -- for the train split only -- all its ``*<extension>`` files), a glob, or a
    comma-separated list of these. ``{split}`` in the pattern is replaced by the split name."""
    if not pattern:
        raise ValueError("data.path is empty: set it to the folder (or glob/list) of the dataset's shards")
    files: list[str] = []
    for part in (p.strip() for p in pattern.replace("{split}", split).split(",")):
        if not part:
            continue
        part = os.path.expanduser(part)
        if os.path.isdir(part):
            found = sorted(glob.glob(os.path.join(part, f"{split}-*{extension}")))
            if not found and os.path.isdir(os.path.join(part, split)):
                found = sorted(glob.glob(os.path.join(part, split, f"*{extension}")))
            if not found and train:  # unsplit shards; never the ones named for an evaluation split
                found = sorted(f for f in glob.glob(os.path.join(part, f"*{extension}"))
                               if not os.path.basename(f).startswith(EVAL_SPLIT_PREFIXES))
            files.extend(found)
        elif any(ch in part for ch in "*?["):
            files.extend(sorted(glob.glob(part)))
        elif os.path.exists(part):
            files.append(part)
        else:
            raise ValueError(f"{part}: no such file or folder")
    if not files:
        raise ValueError(f"no {extension} shards for split {split!r} in {pattern!r}")
    return files
