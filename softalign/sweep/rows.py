"""Grouping aggregated run rows by their variables' values (shared by the tables and the plots)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def groups(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[tuple, list[Mapping[str, Any]]]:
    """Rows grouped by their values of ``keys``, in order of first appearance."""
    out: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        out.setdefault(tuple(_hashable(row.get(k)) for k in keys), []).append(row)
    return out


def _hashable(value: Any) -> Any:
    """A grouping key for a variable's value (JSON lists become tuples)."""
    return tuple(value) if isinstance(value, list) else value
