"""Orbax checkpoints of the whole run: train state (params, optimizer, teacher, step, RNG), the Grain
iterator's position and, with the memory teacher, its host bank (numpy arrays), saved asynchronously, keeping the
last N. All items of a step go into the same step directory, so they are committed (or lost) together.

Orbax writes each step to a temporary directory and renames it only when complete, so a process killed mid-save
(even with kill -9) leaves the previous checkpoints intact and the partial one is ignored on restore.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from softalign import workdir as run_files


class CheckpointNotFoundError(FileNotFoundError):
    """No (complete) checkpoint where one was asked for; the message says where and which steps exist."""


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` with the items ``state``, ``data`` and (optional) ``memory``."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                    "memory": ocp.StandardCheckpointHandler()}  # known up front: a fresh manager reads metadata
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None, *, force: bool = False,
             memory: dict[str, np.ndarray] | None = None) -> bool:
        """Starts an (asynchronous) save of ``state``, the iterator's position and the ``memory`` bank arrays
        (``MemoryBank.state_dict()``, written by process 0 only) in one step; returns whether it saved."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if memory is not None:
            items["memory"] = ocp.args.StandardSave(memory)
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            logging.info("Checkpoint of step %d started in %s", step, self.directory)
        return saved

    def restore(self, abstract_state: Any, data_iterator: grain.DatasetIterator | None,
                step: int | None = None) -> tuple[Any, int] | None:
        """Restores ``step`` (default: latest) into the shapes/shardings of ``abstract_state`` and moves
        ``data_iterator`` to its saved position. Returns ``(state, step)`` or ``None`` if nothing is saved."""
        step = self._manager.latest_step() if step is None else step
        if step is None:
            return None
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], step

    def restore_memory(self, step: int) -> dict[str, np.ndarray] | None:
        """The ``memory`` item of ``step`` as numpy arrays (every process reads all of it), or ``None`` when that
        checkpoint has none (e.g. it was written by a run with another teacher)."""
        if "memory" not in self._manager.item_metadata(step):  # a checkpoint without the item does not list it
            return None
        restored = self._manager.restore(step, args=ocp.args.Composite(memory=ocp.args.StandardRestore()))
        return {k: np.asarray(v) for k, v in restored["memory"].items()}

    def wait(self) -> None:
        """Blocks until any asynchronous save has finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


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
