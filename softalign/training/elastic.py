"""Elastic resume: a run checkpointed on N devices (P processes) continues on M devices (Q processes) as an
uninterrupted run would, up to the order of float reductions.

What makes that hold: the global data stream is fixed by the seed and cut into global batches whatever the process
count (``data/pipeline.py``); the PSD subset's strata come from the batch size alone
(``soft_targets.resolve_groups``), and S from the step's RNG, which lives in the train state; Orbax reshards the
state onto the new mesh. What is left is the Grain iterator's position, which is saved per process: this module
re-splits it for another process count, and describes the topology a checkpoint was written on, so a restore
that changes it says so in one line.
"""

from __future__ import annotations

import json
import re
from typing import Any

import jax
from etils import epath

from softalign.config.errors import ConfigError
from softalign.objectives import soft_targets
from softalign.parallel import sharding

TOPOLOGY_ITEM = "topology"  # the checkpoint item (a small JSON) written by `topology`
_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json$")  # Grain's per-process iterator files


def topology(config: Any, mesh: Any) -> dict[str, int]:
    """What a checkpoint records of where it was written: devices, processes, fsdp, batch size and the strata of
    S (the numbers that, if they differed, would change the run)."""
    return {"devices": int(mesh.devices.size), "processes": int(jax.process_count()),
            "data_shards": int(sharding.num_batch_shards(mesh)), "fsdp": int(config.fsdp),
            "batch_size": int(config.batch_size),
            "subset_groups": soft_targets.resolve_groups(config.psd.subset_groups, config.batch_size)}


def _where(t: dict[str, Any]) -> str:
    processes = int(t.get("processes", 1))
    return f"{t.get('devices', '?')} devices / {processes} process{'es' if processes != 1 else ''}"


def describe_change(saved: dict[str, Any] | None, now: dict[str, int]) -> str | None:
    """One line when the checkpoint was written on another topology (None when it was not, or is unknown)."""
    if not saved:
        return None
    same = all(saved.get(k) == now[k] for k in ("devices", "processes", "fsdp"))
    if same and saved.get("subset_groups") == now["subset_groups"] and saved.get("batch_size") == now["batch_size"]:
        return None
    line = f"Elastic resume: the checkpoint was written on {_where(saved)}, this run has {_where(now)}"
    changed = []
    if saved.get("batch_size") != now["batch_size"]:
        changed.append(f"batch_size {saved.get('batch_size')} -> {now['batch_size']} (the data order changes)")
    if saved.get("subset_groups") != now["subset_groups"]:
        changed.append(f"PSD strata {saved.get('subset_groups')} -> {now['subset_groups']} (S changes; set "
                       f"psd.subset_groups={saved.get('subset_groups')} to keep it)")
    if changed:
        return f"{line}; NOT equivalent to an uninterrupted run: " + "; ".join(changed)
    return (f"{line}; data order, PSD subset ({now['subset_groups']} strata) and RNG streams do not depend on "
            "it, so training continues as an uninterrupted run would (up to float reduction order)")


def saved_data_states(data_dir: epath.Path) -> tuple[dict[int, Any], int | None]:
    """``({process index: iterator state}, process count)`` of a checkpoint's ``data`` item (count None if none)."""
    states: dict[int, Any] = {}
    counts = set()
    if data_dir.exists():
        for f in data_dir.iterdir():
            match = _DATA_FILE.search(f.name)
            if match:
                states[int(match.group(1))] = json.loads(f.read_text())
                counts.add(int(match.group(2)))
    if len(counts) > 1:
        raise ConfigError(f"{data_dir} holds iterator states of several process counts {sorted(counts)}")
    return states, (counts.pop() if counts else None)


def _position(state: Any) -> int | None:
    simple = isinstance(state, dict) and set(state) == {"next_index"} and isinstance(state["next_index"], int)
    return state["next_index"] if simple else None


def translate_data_state(states: dict[int, Any], saved_count: int, global_batch: int, process_count: int,
                         template: Any) -> tuple[dict[str, int], str | None]:
    """This process's iterator state for ``process_count`` processes from the ``saved_count`` saved ones, and a
    note when the split is not exact.

    Process p of P reads positions ``[p*b, (p+1)*b)`` of every global batch (b = B/P), so after k global batches
    each saved position is ``k*b`` and the new one is ``k*B/Q``. Records skipped as bad let one process read ahead of
    the others; then the stream resumes after the furthest global batch any process had started (no record is
    trained on twice), which an uninterrupted run would not do exactly: the note says so."""
    if sorted(states) != list(range(saved_count)):
        raise ConfigError(f"the checkpoint's data position lists processes {sorted(states)} of {saved_count}: "
                          "it is incomplete (were the processes' checkpoint folders on different disks?)")
    positions = [_position(states[i]) for i in range(saved_count)]
    if any(p is None for p in positions) or _position(template) is None:
        raise ConfigError(f"the checkpoint was written by {saved_count} process(es) and this run has "
                          f"{process_count}: re-splitting the data position needs data.num_workers=0 on both")
    if global_batch % saved_count or global_batch % process_count:
        raise ConfigError(f"batch_size={global_batch} must divide over the {saved_count} processes of the "
                          f"checkpoint and the {process_count} of this run")
    old_local, new_local = global_batch // saved_count, global_batch // process_count
    batches = max(-(-p // old_local) for p in positions)
    exact = len(set(positions)) == 1 and positions[0] % old_local == 0
    note = None if exact else (
        f"records skipped as bad had moved the {saved_count} processes' data streams apart (positions "
        f"{positions}); resuming after global batch {batches}, so the order differs slightly from an "
        "uninterrupted run")
    return {"next_index": batches * new_local}, note
