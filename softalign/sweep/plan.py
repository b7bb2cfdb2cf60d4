"""A sweep file resolved into runs, ``sweep.json``, each run's command line and whether it has finished.

A sweep file is a Python file with ``get_config()`` (the base experiment; the same file is then every run's
``--config``) and ``get_sweep(**args)`` returning the runs (`softalign.sweep.grid`). `resolve` checks every
override key against the base config, drops overrides equal to the default, removes duplicate runs and gives every
run a value for every swept variable (``variables``), so the aggregator can tabulate and plot them.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

from softalign import workdir as run_files
from softalign.sweep import grid

SWEEP_FILE = "sweep.json"
DONE_FILE = run_files.DONE_FILE
RESULTS_FILE = run_files.RESULTS_FILE
LAUNCH_FILE = "launch.json"    # the launcher's record of each attempt (command, exit code, seconds)
LOG_FILE = "log.txt"


class PlanError(ValueError):
    """A sweep file or grid that cannot work; the message names the run and key."""


def load_module(path: str) -> ModuleType:
    """Imports the Python file ``path`` (its folder on sys.path, as for a config file)."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise PlanError(f"--sweep={path}: no such file")
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    name = "_softalign_sweep_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for fn in ("get_config", "get_sweep"):
        if not callable(getattr(module, fn, None)):
            raise PlanError(f"{path} has no {fn}(): a sweep file defines get_config() and get_sweep()")
    return module


def call_get_sweep(module: ModuleType, args: Mapping[str, Any]) -> list[grid.Run]:
    """``module.get_sweep(**args)`` as a list of `grid.Run` (dicts with name/overrides/tags are accepted too)."""
    params = inspect.signature(module.get_sweep).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in args if k not in params and not takes_any]
    if unknown:
        raise PlanError(f"get_sweep() takes no argument(s) {unknown}; it takes {list(params)}")
    runs = []
    for item in module.get_sweep(**args):
        if isinstance(item, Mapping):
            tags = dict(item.get("tags", {}))
            item = grid.Run(item.get("name") or grid.run_name(tags), dict(item["overrides"]), tags)
        runs.append(item)
    return runs


def get_dotted(config: Any, key: str) -> Any:
    """``config.a.b`` for key ``'a.b'``; `PlanError` naming the key when it does not exist."""
    node = config
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError):
            raise PlanError(f"unknown config key {key!r}") from None
    return node


def resolve(runs: Sequence[grid.Run], base: Any) -> list[grid.Run]:
    """Checks override keys, drops overrides equal to ``base``'s values, removes duplicates (`grid.dedupe`)."""
    cleaned = []
    for run in runs:
        overrides = {}
        for key, value in run.overrides.items():
            try:
                default = get_dotted(base, key)
            except PlanError as e:
                raise PlanError(f"run {run.name}: {e}") from None
            if hasattr(default, "to_dict"):
                raise PlanError(f"run {run.name}: {key!r} is a group of keys; override its leaves instead")
            if grid.canonical({key: value}) != grid.canonical({key: default}):
                overrides[key] = value
        cleaned.append(grid.Run(run.name, overrides, dict(run.tags), dict(run.keys)))
    return grid.dedupe(cleaned)


def variables(runs: Sequence[grid.Run], base: Any) -> dict[str, dict[str, Any]]:
    """``{run name: {variable: value}}`` over every variable any run is tagged with (in order of first use). A run
    without a tag for a value axis gets that key's effective value (its override, else the base config's)."""
    names: list[str] = []
    keys: dict[str, str] = {}
    for run in runs:
        names.extend(n for n in run.tags if n not in names)
        keys.update({n: k for n, k in run.keys.items() if n not in keys})
    out = {}
    for run in runs:
        values = {}
        for n in names:
            if n in run.tags:
                values[n] = run.tags[n]
            elif n in keys:
                values[n] = run.overrides.get(keys[n], _plain(get_dotted(base, keys[n])))
            else:
                values[n] = None
        out[run.name] = values
    return out


def _plain(value: Any) -> Any:
    """A config value as JSON keeps it (tuples become lists), so sweep.json round-trips it."""
    return list(value) if isinstance(value, tuple) else value


def flag_value(value: Any) -> str:
    """A value as ml_collections' ``--config.key=`` flags parse it (floats exactly, tuples as ``(a, b)``)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        inner = ", ".join(repr(v) for v in value)
        return f"({inner}{',' if len(value) == 1 else ''})"
    return str(value)


def run_command(python: str, sweep_file: str, workdir: str, overrides: Mapping[str, Any],
                extra: Sequence[str]) -> list[str]:
    """The ``python -m softalign.main`` command line of one run (the sweep file is its --config)."""
    flags = [f"--config.{k}={flag_value(v)}" for k, v in overrides.items()]
    return [python, "-m", "softalign.main", f"--config={sweep_file}", f"--workdir={workdir}", *flags, *extra]


def expected_num_steps(base: Any, overrides: Mapping[str, Any], extra: Sequence[str]) -> int:
    """The run's ``num_steps``: the last ``--config.num_steps=`` of ``extra``, else the override, else the base."""
    steps = overrides.get("num_steps", base.num_steps)
    for arg in extra:
        if arg.startswith("--config.num_steps="):
            steps = arg.split("=", 1)[1]
    return int(steps)


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing or unreadable (e.g. half-written)."""
    data = run_files.read_json(path)
    return data if isinstance(data, dict) else None


def run_status(workdir: str, num_steps: int | None = None) -> str:
    """``finished`` (done.json at num_steps, when given), ``stale`` (finished with another num_steps),
    ``partial`` (has checkpoints or a log) or ``new``."""
    done = read_json(os.path.join(workdir, DONE_FILE))
    if done is not None and int(done.get("step", -1)) >= int(done.get("num_steps", 1 << 62)):
        if num_steps is None or int(done["num_steps"]) == int(num_steps):
            return "finished"
        return "stale"
    if os.path.isdir(run_files.checkpoints_dir(workdir)) or os.path.exists(os.path.join(workdir, LOG_FILE)):
        return "partial"
    return "new"


def write_sweep_json(root: str, sweep_file: str, args: Mapping[str, Any], extra: Sequence[str],
                     runs: Sequence[grid.Run], values: Mapping[str, Mapping[str, Any]]) -> str:
    """Writes ``ROOT/sweep.json`` with the resolved grid. Runs of an earlier launch that are not in this grid (e.g.
    other seeds) are kept after the current ones, so the aggregator still finds them."""
    path = os.path.join(root, SWEEP_FILE)
    entries = [dict(run.to_json(), variables=dict(values[run.name])) for run in runs]
    current = {e["name"] for e in entries}
    old = read_json(path) or {}
    entries += [e for e in old.get("runs", []) if e.get("name") not in current]
    order: list[str] = []
    for e in entries:
        order.extend(v for v in e.get("variables", {}) if v not in order)
    payload = {"sweep_file": os.path.abspath(sweep_file), "args": dict(args), "extra_args": list(extra),
               "variables": order, "runs": entries, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.makedirs(root, exist_ok=True)
    staged = path + ".tmp"
    with open(staged, "w") as f:
        json.dump(payload, f, indent=2, default=repr)
    os.replace(staged, path)
    return path
