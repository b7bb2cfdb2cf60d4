"""Host-side store of the ``memory`` teacher: each training record's student embeddings from its last visit.

The bank holds, in host RAM as numpy (never on the accelerator), an image and a text embedding per record of the
train split plus the step that wrote them (-1: never seen), indexed by the record index the Grain pipeline puts
in ``batch["index"]`` (the record's number in the train source, in ``[0, len(train source))``, the same for a
record in every epoch; with ``data.train_fraction < 1`` it is the position in the subset). Memory per process:
``N * (2 * D * itemsize + 4)`` bytes; every process keeps the whole bank (all write the same gathered global
batch), and an Orbax save deep-copies it on the host, so the peak is twice that.

The train loop (``softalign/training/train.py``) runs, for step t:

1. ``lookup(index_t)`` -> ``memory_image``/``memory_text``/``memory_seen`` rows, added to the batch;
2. dispatch the jitted step t, which returns this batch's student embeddings as its host output;
3. ``stage(output_t, t)``: write back step t-1's embeddings (fetching them waits for step t-1 only, while step t
   is already queued: no host sync on the step in flight), then keep step t's device arrays pending.

So the lookup for step t sees the writes of every step up to t-2; step t-1's is still pending. That is still
"the previous visit" for every record not in the batch just before: within an epoch a record appears once, and
two visits of a record land in consecutive batches only across an epoch boundary (about B²/N records per epoch,
B the global batch and N the records), negligible unless the epoch is a few batches long. Such a row sees the
visit before (or is unseen). The pending write is part of :meth:`state_dict`, so a resumed run looks up exactly
what an uninterrupted one would. A non-finite step's embeddings may reach the bank, but the run stops at the
next finiteness check, before any checkpoint could include them.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_dtypes
import numpy as np

DTYPES: dict[str, Any] = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
# Extra batch entries the loop adds and the memory teacher reads.
MEMORY_IMAGE, MEMORY_TEXT, MEMORY_SEEN = "memory_image", "memory_text", "memory_seen"


def bank_nbytes(size: int, dim: int, dtype: str) -> int:
    """Host bytes of a bank of ``size`` records and ``dim``-wide embeddings: two embeddings plus an int32 step."""
    return int(size) * (2 * int(dim) * np.dtype(DTYPES[dtype]).itemsize + 4)


def host_ram_bytes() -> int:
    """This host's physical RAM (0 where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def check_fits(size: int, dim: int, dtype: str, ram: int | None = None, fraction: float = 0.4) -> None:
    """Refuses a bank that, doubled while a checkpoint is saved, would take more than ``fraction`` of host RAM:
    a clear error at start-up instead of an out-of-memory kill hours in. Says what to change."""
    ram = host_ram_bytes() if ram is None else ram
    need = bank_nbytes(size, dim, dtype)
    if ram > 0 and 2 * need > fraction * ram:
        raise MemoryError(
            f"the memory teacher's host bank needs {need / 2**30:.1f} GiB per process ({size} records x 2 x {dim} "
            f"{dtype}), twice that while a checkpoint is saved, on a host with {ram / 2**30:.1f} GiB. Set "
            "psd.memory_dtype='float16' (half), or psd.teacher='ema' (no bank; an extra forward on rho*B rows).")


class MemoryBank:
    """Per-record image/text embeddings of the student from each record's last visit (host numpy arrays)."""

    def __init__(self, size: int, dim: int, dtype: str = "float32"):
        if dtype not in DTYPES:
            raise ValueError(f"memory bank dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if size <= 0 or dim <= 0:
            raise ValueError(f"memory bank needs positive size and dim, got {size} x {dim}")
        self.size, self.dim, self.dtype = int(size), int(dim), np.dtype(DTYPES[dtype])
        # np.zeros maps untouched pages lazily: a bank costs RAM only as records are first written.
        self.image = np.zeros((self.size, self.dim), self.dtype)
        self.text = np.zeros((self.size, self.dim), self.dtype)
        self.last_step = np.full((self.size,), -1, np.int32)
        self._pending: dict[str, Any] | None = None  # the step's output not yet written (see module docstring)

    @property
    def nbytes(self) -> int:
        """Host bytes of the bank's arrays."""
        return self.image.nbytes + self.text.nbytes + self.last_step.nbytes

    def describe(self) -> str:
        """The start-up line: records, width and host size."""
        return (f"memory teacher bank: N={self.size}, D={self.dim}, {self.dtype.name}, "
                f"{self.nbytes / 2**20:.1f} MiB host (per process)")

    def _check(self, indices: Any) -> np.ndarray:
        idx = np.asarray(indices).astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.size):
            raise ValueError(f"record index out of range [0, {self.size}) for the memory bank: "
                             f"min {idx.min()}, max {idx.max()}")
        return idx

    def lookup(self, indices: Any) -> dict[str, np.ndarray]:
        """The rows of ``indices`` as extra batch entries: embeddings in the bank's dtype and a seen mask."""
        idx = self._check(indices)
        return {MEMORY_IMAGE: self.image[idx], MEMORY_TEXT: self.text[idx], MEMORY_SEEN: self.last_step[idx] >= 0}

    def write(self, indices: Any, image_emb: Any, text_emb: Any, step: int) -> None:
        """Stores the embeddings of ``indices`` (cast to the bank's dtype), written at ``step``.

        A record twice in one batch (an epoch boundary inside the batch) keeps its last row: NumPy leaves the
        winner of repeated fancy-index assignments unspecified, so duplicates are removed first.
        """
        idx = self._check(indices)
        image_emb, text_emb = np.asarray(image_emb), np.asarray(text_emb)
        if image_emb.shape != (idx.size, self.dim) or text_emb.shape != (idx.size, self.dim):
            raise ValueError(f"expected embeddings of shape ({idx.size}, {self.dim}), got "
                             f"{image_emb.shape} and {text_emb.shape}")
        _, first_in_reversed = np.unique(idx[::-1], return_index=True)
        keep = idx.size - 1 - first_in_reversed
        self.image[idx[keep]] = image_emb[keep].astype(self.dtype)
        self.text[idx[keep]] = text_emb[keep].astype(self.dtype)
        self.last_step[idx[keep]] = step

    def stage(self, output: dict[str, jax.Array], step: int) -> None:
        """Writes the previously staged step's embeddings, then keeps ``output`` (step ``step``'s, still on the
        device and possibly not computed yet) for the next call. ``output`` is ``{"index", "image", "text"}`` of
        the global batch, replicated, so every process writes the whole batch into its own full bank."""
        self._commit()
        self._pending = dict(output, step=step)

    def _commit(self) -> None:
        if self._pending is not None:
            p = _to_host(self._pending)
            self.write(p["index"], p["image"], p["text"], int(p["step"]))
            self._pending = None

    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays to checkpoint: the bank and the staged (not yet written) step. Not copies: Orbax deep-copies
        host arrays before an asynchronous save returns (``NumpyHandler(deepcopy_host_arrays=True)``)."""
        state = {"image": self.image, "text": self.text, "last_step": self.last_step}
        if self._pending is not None:
            self._pending = _to_host(self._pending)
            state.update({f"pending_{k}": np.asarray(v) for k, v in self._pending.items()})
        return state

    def load(self, state: dict[str, np.ndarray]) -> None:
        """Restores :meth:`state_dict` arrays; the bank's size, width and dtype must match."""
        for key, ref in (("image", self.image), ("text", self.text), ("last_step", self.last_step)):
            value = np.asarray(state[key])
            if value.shape != ref.shape or value.dtype != ref.dtype:
                raise ValueError(f"checkpointed memory bank {key} is {value.dtype}{list(value.shape)}, this run "
                                 f"expects {ref.dtype}{list(ref.shape)} (train split size, model.embed_dim and "
                                 f"psd.memory_dtype must not change on resume)")
            ref[...] = value
        self._pending = None
        if "pending_index" in state:
            self._pending = {k: np.asarray(state[f"pending_{k}"]) for k in ("index", "image", "text", "step")}


def _to_host(pending: dict[str, Any]) -> dict[str, Any]:
    """Fetches staged arrays. They are replicated over the mesh, so any addressable copy is the whole value
    (also on multi-host meshes, where the global array is not fully addressable)."""
    def fetch(x):
        return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)
    return {k: fetch(v) for k, v in pending.items()}
