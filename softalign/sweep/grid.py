"""Sweep grids: runs as named sets of dotted config overrides, built from axes with a few helpers.

A run is ``Run(name, overrides, tags)``: ``overrides`` maps dotted config keys to values (``{"psd.teacher":
"ema"}``), ``tags`` maps the swept variables to the run's level (``{"method": "psd-ema", "noise": 0.5, "seed":
0}``) and ``name`` is made from the tags, e.g. ``method=psd-ema,noise=0.5,seed=0`` (deterministic and safe as a
directory name). An axis is a variable with levels; a level is a label plus the overrides it sets:

- named levels, for methods: ``{"clip": {"psd.alpha_max": 0.0}, "psd-ema": {"psd.teacher": "ema"}}``;
- plain values of one config key: ``noise=[0.0, 0.2]`` sets ``data.caption_noise`` (`KNOWN_AXES` maps the short
  names ``noise``, ``fraction`` and ``seed``; ``axis("alpha_max", [...], key="psd.alpha_max")`` any other key).

``product(method=METHODS, noise=[0.0, 0.5], seed=[0])`` is the full grid of its axes; ``one_at_a_time`` varies
one axis at a time from the base config; ``combine`` concatenates grids and removes duplicates (runs with the
same overrides become one run, whose tags merge). `softalign.sweep.plan.resolve` repeats that against the base
config, so an override equal to the default (``fraction=1.0``) does not make a second run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

KNOWN_AXES: dict[str, str] = {
    "noise": "data.caption_noise",
    "fraction": "data.train_fraction",
    "seed": "seed",
}
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_MAX_NAME = 200


@dataclasses.dataclass(frozen=True)
class Level:
    """One level of an axis: its label (shown in run names and tables) and the overrides it sets."""

    label: Any
    overrides: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Axis:
    """A swept variable: ``name``, its levels and, for a plain-value axis, the config ``key`` it sets."""

    name: str
    levels: tuple[Level, ...]
    key: str | None = None


@dataclasses.dataclass
class Run:
    """One run of a sweep: its name, dotted config overrides, swept-variable tags, and the keys of value axes."""

    name: str
    overrides: dict[str, Any]
    tags: dict[str, Any]
    keys: dict[str, str] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (as stored in ``sweep.json``)."""
        return {"name": self.name, "overrides": dict(self.overrides), "tags": dict(self.tags),
                "keys": dict(self.keys)}


def axis(name: str, values: Any, key: str | None = None) -> Axis:
    """An axis from named levels (a mapping label -> overrides) or plain values of ``key`` (default:
    ``KNOWN_AXES[name]``, else ``name`` itself when it is a dotted key)."""
    if isinstance(values, Axis):
        return values
    if isinstance(values, Mapping):
        if key is not None:
            raise ValueError(f"axis {name!r}: named levels set their own keys; drop key={key!r}")
        levels = tuple(Level(label, dict(overrides)) for label, overrides in values.items())
        return Axis(name, levels)
    key = key or KNOWN_AXES.get(name) or (name if "." in name else None)
    if key is None:
        raise ValueError(f"axis {name!r}: plain values need a config key (axis({name!r}, values, key='a.b')) or "
                         f"one of the known axes {sorted(KNOWN_AXES)}")
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        values = [values]
    return Axis(name, tuple(Level(v, {key: v}) for v in values), key)


def pick(named: Mapping[str, Mapping[str, Any]], *labels: str) -> dict[str, dict[str, Any]]:
    """The named levels ``labels`` of ``named`` (in that order), e.g. two methods out of a table of methods."""
    unknown = [label for label in labels if label not in named]
    if unknown:
        raise KeyError(f"unknown levels {unknown}; known: {sorted(named)}")
    return {label: dict(named[label]) for label in labels}


def format_value(value: Any) -> str:
    """A short, exact text for a level: ``0.2``, ``0``, ``1e-05``, ``ema``, ``True``."""
    if isinstance(value, float):
        text = f"{value:g}"
        return text if float(text) == value else repr(value)
    return str(value)


def run_name(tags: Mapping[str, Any]) -> str:
    """``a=x,b=y`` from the tags, restricted to filesystem-safe characters; ``base`` for no tags. Long names are
    cut and end in a hash of the full name, so they stay unique."""
    if not tags:
        return "base"
    name = ",".join(f"{k}={format_value(v)}" for k, v in tags.items())
    safe = _UNSAFE.sub("_", name)
    if len(safe) > _MAX_NAME or safe in (".", ".."):
        safe = safe[:_MAX_NAME - 13] + "~" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return safe


def _make_run(pairs: Sequence[tuple[Axis, Level]]) -> Run:
    """The run of one level per axis: their overrides merged (a conflict is an error), tags and keys."""
    overrides: dict[str, Any] = {}
    for ax, level in pairs:
        for key, value in level.overrides.items():
            if key in overrides and overrides[key] != value:
                raise ValueError(f"axes disagree on {key}: {overrides[key]!r} vs {value!r} (axis {ax.name!r})")
            overrides[key] = value
    tags = {ax.name: level.label for ax, level in pairs}
    keys = {ax.name: ax.key for ax, _ in pairs if ax.key}
    return Run(run_name(tags), overrides, tags, keys)


def product(*axes: Axis, **named_axes: Any) -> list[Run]:
    """Every combination of the axes' levels (the first axis varies slowest); keyword axes go through `axis`."""
    all_axes = list(axes) + [axis(name, values) for name, values in named_axes.items()]
    names = [a.name for a in all_axes]
    if len(set(names)) != len(names):
        raise ValueError(f"an axis appears twice: {names}")
    return [_make_run(list(zip(all_axes, combo))) for combo in itertools.product(*(a.levels for a in all_axes))]


def one_at_a_time(*axes: Axis, fixed: Sequence[Run] | None = None, **named_axes: Any) -> list[Run]:
    """A base run (no overrides) plus one run per level of each axis, the other axes at their defaults; each run
    is also crossed with ``fixed`` (e.g. ``product(seed=[0, 1])``), if given. For tuning around a default."""
    all_axes = list(axes) + [axis(name, values) for name, values in named_axes.items()]
    single = [Run("base", {}, {})] + [_make_run([(a, level)]) for a in all_axes for level in a.levels]
    return cross(single, fixed) if fixed else single


def cross(left: Sequence[Run], right: Sequence[Run]) -> list[Run]:
    """Every run of ``left`` combined with every run of ``right`` (overrides and tags merged)."""
    out = []
    for a, b in itertools.product(left, right):
        clash = {k for k in set(a.overrides) & set(b.overrides) if a.overrides[k] != b.overrides[k]}
        if clash:
            raise ValueError(f"runs {a.name} and {b.name} disagree on {sorted(clash)}")
        tags = {**a.tags, **b.tags}
        out.append(Run(run_name(tags), {**a.overrides, **b.overrides}, tags, {**a.keys, **b.keys}))
    return out


def canonical(overrides: Mapping[str, Any]) -> str:
    """A key equal for equal override sets (sorted, tuples as lists, 1 == 1.0)."""

    def norm(v: Any) -> Any:
        """JSON-ready and equal for equal values: tuples as lists, integral numbers as floats."""
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, (int, float)) and math.isfinite(v) and float(v).is_integer():
            return float(v)
        return v

    return json.dumps({k: norm(v) for k, v in sorted(overrides.items())}, sort_keys=True, default=repr)


def dedupe(runs: Iterable[Run]) -> list[Run]:
    """Runs with the same overrides merged into the first of them (tags of later copies are added when missing);
    two different runs with the same name are an error."""
    by_key: dict[str, Run] = {}
    by_name: dict[str, str] = {}
    for run in runs:
        key = canonical(run.overrides)
        if key in by_key:
            first = by_key[key]
            first.tags = {**first.tags, **{k: v for k, v in run.tags.items() if k not in first.tags}}
            first.keys = {**run.keys, **first.keys}
            continue
        if run.name in by_name:
            raise ValueError(f"two different runs are both named {run.name!r}: {by_name[run.name]} and {key}; "
                             "give their levels different labels")
        by_key[key] = dataclasses.replace(run, overrides=dict(run.overrides), tags=dict(run.tags), keys=dict(run.keys))
        by_name[run.name] = key
    return list(by_key.values())


def combine(*grids: Iterable[Run]) -> list[Run]:
    """The runs of all ``grids`` in order, duplicates removed (see `dedupe`)."""
    return dedupe(run for grid in grids for run in grid)
