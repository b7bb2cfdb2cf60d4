"""Orbax checkpoints of the whole run: train state (params, optimizer, teacher, step, RNG), the Grain
iterator's position, the topology it was written on and, with the memory teacher, its host bank (numpy arrays),
saved asynchronously, keeping the last N. All items of a step go into the same step directory, so they are
committed (or lost) together.

Orbax writes each step to a temporary directory and renames it only when complete, so a process killed mid-save
(even with kill -9) leaves the previous checkpoints intact and the partial one is ignored on restore.

A save that fails (disk full, quota, permissions) is a `CheckpointSaveError` with one line naming the path, the
reason and the free space, raised at the first point the loop asks (`save_failed`, every step with one process),
not at the next save: Orbax defers a background failure to the next ``wait_until_finished`` and raises it only
once per thread, so this class keeps the failure itself. A save that would not fit in the free space (measured
against the last checkpoint's size) is refused before it starts, so no partial write and no library noise.
Old checkpoints are deleted only after a new one is committed, so every earlier checkpoint is kept.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from softalign import workdir as run_files
from softalign.training import elastic


class CheckpointNotFoundError(FileNotFoundError):
    """No (complete) checkpoint where one was asked for; the message says where and which steps exist."""


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; the message is one line: step, path, reason, free space, what is kept."""


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _reason(error: BaseException | None) -> str:
    """A short reason for a failed save, found anywhere in the exception chain (Orbax wraps OS errors; tensorstore
    reports a full disk as RESOURCE_EXHAUSTED ... [os_error_code='28'])."""
    seen, e = [], error
    while e is not None and e not in seen:
        seen.append(e)
        text = str(e)
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in text \
                or "os_error_code='28'" in text:
            return "no space left on device"
        if (isinstance(e, OSError) and e.errno == errno.EDQUOT) or "os_error_code='122'" in text:
            return "disk quota exceeded"
        e = e.__cause__ or e.__context__
    if error is None:
        return "the step directory was never committed"
    first = (str(error).splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:300]}" if first else type(error).__name__


def _disk_usage(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` with the items ``state``, ``data``, ``topology`` and (optional)
    ``memory``, and save failures kept until reported."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self._local = "://" not in self.directory
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                    "memory": ocp.StandardCheckpointHandler(),
                    elastic.TOPOLOGY_ITEM: ocp.JsonCheckpointHandler()}  # known up front: a fresh manager reads them
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._pending: int | None = None  # the step whose save is in flight
        self.failure: CheckpointSaveError | None = None
        latest = self._manager.latest_step()
        self._last_size = self._step_size(latest) if latest is not None else 0
        self.notes: list[str] = []  # what a restore had to adapt (e.g. the data position on another process count)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def _step_dir(self, step: int) -> epath.Path:
        return epath.Path(self.directory) / str(step)

    def _step_size(self, step: int) -> int:
        return _disk_usage(str(self._step_dir(step))) if self._local else 0

    def kept_steps(self) -> list[int]:
        """The committed checkpoints on disk."""
        return sorted(int(s) for s in self._manager.all_steps())

    def _fail(self, step: int, error: BaseException | None, *, refused: str = "") -> CheckpointSaveError:
        """Records (and returns) the failure of ``step``'s save as one line; frees its partial directory."""
        free = ""
        if self._local and not refused:
            try:
                usage = shutil.disk_usage(self.directory)
                free = f" ({_size(usage.free)} free of {_size(usage.total)} on that disk"
            except OSError:
                pass
        partials = glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")) if self._local else []
        if partials and jax.process_index() == 0:
            for partial in partials:
                shutil.rmtree(partial, ignore_errors=True)
            free += "; its partial files were removed" if free else ""
        free += ")" if free else ""
        kept = self.kept_steps()
        kept_text = f"checkpoints kept: steps {', '.join(map(str, kept))}" if kept else "no checkpoint is kept"
        what = refused or f"failed: {_reason(error)}"
        self.failure = CheckpointSaveError(
            f"checkpoint of step {step} in {self.directory} {what}{free}; training stopped, {kept_text} "
            "(free some space and rerun to resume)")
        return self.failure

    def _settle(self, block: bool) -> None:
        """Finishes the bookkeeping of the save in flight (waits for it when ``block``): a failure is recorded,
        a success measured (the next save's space check)."""
        if self._pending is None or (not block and self._manager.is_saving_in_progress()):
            return
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - Orbax re-raises the background thread's error, of any type
            self._fail(step, e)
            return
        if self._local and jax.process_index() == 0 and not self._step_dir(step).exists():
            self._fail(step, None)
            return
        self._last_size = self._step_size(step)

    def _check_space(self, step: int) -> None:
        """Refuses a save that cannot fit: a new checkpoint needs about the last one's size (old ones are deleted
        only after it commits). All processes follow process 0's measurement."""
        if not self._local or not self._last_size:
            return
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            return
        need = int(self._last_size * 1.05) + (1 << 20)
        ok = free >= need
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            ok = bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
        if not ok:
            raise self._fail(step, None, refused=f"was not started: it needs about {_size(need)} (the last "
                                                  f"checkpoint's size) and only {_size(free)} are free")

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None, *, force: bool = False,
             memory: dict[str, np.ndarray] | None = None, topology: dict[str, Any] | None = None) -> bool:
        """Starts an (asynchronous) save of ``state``, the iterator's position, the ``topology`` and the
        ``memory`` bank arrays (``MemoryBank.state_dict()``, written by process 0 only) in one step; returns whether
        it saved. Raises `CheckpointSaveError` if this or the previous save failed."""
        self._settle(block=True)
        if self.failure is not None:
            raise self.failure
        self._check_space(step)
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if memory is not None:
            items["memory"] = ocp.args.StandardSave(memory)
        if topology is not None:
            items[elastic.TOPOLOGY_ITEM] = ocp.args.JsonSave(topology)
        try:
            saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:  # noqa: BLE001 - a synchronous part of the save failed (e.g. creating its folder)
            raise self._fail(step, e) from None
        if saved:
            self._pending = step
            logging.info("Checkpoint of step %d started in %s", step, self.directory)
        return saved

    def save_failed(self) -> bool:
        """Whether a save has failed (without waiting for one in flight): cheap enough to ask every step."""
        self._settle(block=False)
        return self.failure is not None

    def wait(self) -> None:
        """Blocks until any asynchronous save has finished; raises `CheckpointSaveError` if one failed, so
        ``done.json`` is written only over a committed final checkpoint."""
        self._settle(block=True)
        if self.failure is not None:
            raise self.failure

    def raise_failure(self) -> None:
        """Raises the recorded failure (after waiting for the save in flight), or one saying another process's
        save failed."""
        self.wait()
        raise CheckpointSaveError(f"a checkpoint save failed on another process (see its log); checkpoints kept "
                                  f"in {self.directory}: steps {self.kept_steps()}")

    def last_good_step(self) -> int | None:
        """The latest committed checkpoint, once the save in flight (if any) has finished or failed."""
        self._settle(block=True)
        return self._manager.latest_step()

    def restore(self, abstract_state: Any, data_iterator: grain.DatasetIterator | None,
                step: int | None = None, *, global_batch_size: int | None = None) -> tuple[Any, int] | None:
        """Restores ``step`` (default: latest) into the shapes/shardings of ``abstract_state`` (any mesh: Orbax
        reshards) and moves ``data_iterator`` to its saved position, re-split when the checkpoint was written by
        another number of processes (needs ``global_batch_size``). Returns ``(state, step)`` or ``None``."""
        step = self._manager.latest_step() if step is None else step
        if step is None:
            return None
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        translated = None
        if data_iterator is not None:
            states, count = elastic.saved_data_states(self._step_dir(step) / "data")
            if count is None or count == jax.process_count():
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            else:
                translated, note = elastic.translate_data_state(
                    states, count, int(global_batch_size or 0), jax.process_count(), data_iterator.get_state())
                self.notes.append(note or f"data position re-split from {count} to {jax.process_count()} processes")
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if translated is not None:
            data_iterator.set_state(translated)
            if hasattr(data_iterator, "start_prefetch"):
                data_iterator.start_prefetch()
        return restored["state"], step

    def restore_topology(self, step: int) -> dict[str, Any] | None:
        """The topology item of ``step`` (None for checkpoints written before it existed)."""
        if elastic.TOPOLOGY_ITEM not in self._manager.item_metadata(step):
            return None
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{elastic.TOPOLOGY_ITEM: ocp.args.JsonRestore()}))
        return dict(restored[elastic.TOPOLOGY_ITEM])

    def restore_memory(self, step: int) -> dict[str, np.ndarray] | None:
        """The ``memory`` item of ``step`` as numpy arrays (every process reads all of it), or ``None`` when that
        checkpoint has none (e.g. it was written by a run with another teacher)."""
        if "memory" not in self._manager.item_metadata(step):  # a checkpoint without the item does not list it
            return None
        restored = self._manager.restore(step, args=ocp.args.Composite(memory=ocp.args.StandardRestore()))
        return {k: np.asarray(v) for k, v in restored["memory"].items()}

    def close(self) -> None:
        """Waits for a save in flight (a failure is recorded, not raised: call `wait` first to see it) and closes."""
        self._settle(block=True)
        try:
            self._manager.close()
        except Exception as e:  # noqa: BLE001 - closing after a failed save must not hide the error being reported
            logging.warning("closing the checkpoint manager: %s", _reason(e))


def abstract_like(tree: Any) -> Any:
    """``ShapeDtypeStruct``s (with shardings) of a pytree of arrays, for restoring into the same layout."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore_params(workdir: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int, str]:
    """Reads only ``params`` of checkpoint ``step`` (default latest) under ``WORKDIR/checkpoints`` (an Orbax partial
    restore: no optimizer or teacher state is read). Returns ``(params, step, path)``."""
    directory = run_files.checkpoints_dir(workdir)
    if not os.path.isdir(directory):
        raise CheckpointNotFoundError(f"no checkpoints in {directory} (train first: python -m softalign.main ...)")
    ckpt = Checkpointer(directory)
    try:
        latest = ckpt.latest_step()
    finally:
        ckpt.close()
    if latest is None:
        raise CheckpointNotFoundError(f"no complete checkpoint in {directory}")
    step = latest if step is None else int(step)
    path = os.path.join(ckpt.directory, str(step), "state")
    if not os.path.isdir(path):
        steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit())
        raise CheckpointNotFoundError(f"no checkpoint of step {step} in {directory}; saved steps: {steps}")
    target = {"params": abstract_params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))
    return restored["params"], step, path
