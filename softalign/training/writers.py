"""TensorFlow-free metric writers (the parts of CLU's MetricWriter interface softalign uses: scalars, images,
texts, raw summaries and hparams, by duck typing) and a progress reporter.

clu.metric_writers and clu.periodic_actions import TensorFlow; these use tensorboardX and absl logging instead.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
import tensorboardX
from absl import logging
from tensorboardX import summary as tbx_summary
from tensorboardX.proto import summary_pb2, tensor_pb2, tensor_shape_pb2

from softalign.workdir import SCALARS_FILE

Array = Any  # np.ndarray or jax.Array.
Scalar = Any  # Python, numpy or jax scalar.

_DTYPES = {"float32": "DT_FLOAT", "float64": "DT_DOUBLE", "int32": "DT_INT32", "int64": "DT_INT64", "bool": "DT_BOOL"}


def _scalar(value: Scalar) -> float:
    """A Python float from a Python/numpy/jax scalar or one-element array."""
    arr = np.asarray(jax.device_get(value))
    if arr.size != 1:
        raise ValueError(f"expected a scalar, got shape {arr.shape}")
    return float(arr.reshape(()))


def _fmt(value: Any) -> str:
    """Compact text for a logged value: ints as ints, floats with 6 significant digits."""
    if isinstance(value, str):
        return value
    arr = np.asarray(jax.device_get(value))
    if arr.size != 1:
        return f"array{arr.shape}"
    v = arr.reshape(()).item()
    return f"{v:.6g}" if isinstance(v, float) else str(v)


class TensorBoardWriter:
    """Writes TensorBoard event files into `logdir` with tensorboardX (same methods as clu MetricWriter)."""

    def __init__(self, logdir: str, flush_secs: int = 30):
        if "://" not in logdir:  # tensorboardX creates remote (gs://, s3://) directories itself
            os.makedirs(logdir, exist_ok=True)
        self._writer = tensorboardX.SummaryWriter(logdir=logdir, flush_secs=flush_secs)
        self.logdir = logdir

    def write_summaries(self, step: int, values: Mapping[str, Array], metadata: Optional[Mapping[str, Any]] = None):
        """Raw numeric tensor summaries; `metadata[key]` may be a SummaryMetadata proto or its serialised bytes."""
        for key, value in values.items():
            arr = np.asarray(jax.device_get(value))
            shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d)
                                                           for d in arr.shape])
            arr = arr if arr.dtype.name in _DTYPES else arr.astype(np.float32)
            tensor = tensor_pb2.TensorProto(dtype=_DTYPES[arr.dtype.name], tensor_shape=shape,
                                            tensor_content=arr.tobytes())
            md = (metadata or {}).get(key)
            val = summary_pb2.Summary.Value(tag=key, tensor=tensor)
            if md is not None:
                val.metadata.ParseFromString(md if isinstance(md, bytes) else md.SerializeToString())
            self._writer.file_writer.add_summary(summary_pb2.Summary(value=[val]), step)

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]):
        for key, value in scalars.items():
            self._writer.add_scalar(key, _scalar(value), global_step=int(step))

    def write_images(self, step: int, images: Mapping[str, Array]):
        """Images `(N, H, W, C)` or `(H, W, C)`, uint8 or float in [0, 1]; N images become one grid."""
        for key, value in images.items():
            arr = np.asarray(jax.device_get(value))
            arr = arr[None] if arr.ndim == 3 else arr
            self._writer.add_images(key, arr, global_step=int(step), dataformats="NHWC")

    def write_texts(self, step: int, texts: Mapping[str, str]):
        for key, value in texts.items():
            self._writer.add_text(key, value, global_step=int(step))

    def write_hparams(self, hparams: Mapping[str, Any]):
        """Hyperparameters for the HParams dashboard; non-basic values are written as strings."""
        clean = {}
        for key, value in hparams.items():
            if isinstance(value, (np.generic, np.ndarray)) and np.size(value) == 1:
                value = np.asarray(value).item()
            clean[key] = value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
        for proto in tbx_summary.hparams(clean, {}):
            self._writer.file_writer.add_summary(proto)

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class LoggingWriter:
    """Logs each write as one absl INFO line, e.g. `[100] loss=0.693, lr=0.001`."""

    def __init__(self, collection: Optional[str] = None):
        self._prefix = f"[{collection}] " if collection else ""

    def _log(self, step: Optional[int], items: Sequence[str]):
        head = "" if step is None else f"[{step}] "
        logging.info("%s%s%s", self._prefix, head, ", ".join(items))

    def write_summaries(self, step: int, values: Mapping[str, Array], metadata: Optional[Mapping[str, Any]] = None):
        self._log(step, [f"{k}={_fmt(v)}" for k, v in values.items()])

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]):
        self._log(step, [f"{k}={_fmt(v)}" for k, v in scalars.items()])

    def write_images(self, step: int, images: Mapping[str, Array]):
        self._log(step, [f"image {k} {np.shape(v)}" for k, v in images.items()])

    def write_texts(self, step: int, texts: Mapping[str, str]):
        self._log(step, [f"{k}={v!r}" for k, v in texts.items()])

    def write_hparams(self, hparams: Mapping[str, Any]):
        self._log(None, ["hparams: " + ", ".join(f"{k}={_fmt(v) if v is not None else None}"
                                                  for k, v in hparams.items())])

    def flush(self):
        """Nothing is buffered."""

    def close(self):
        """Nothing to release."""


class JsonlWriter:
    """Scalars as one JSON object per call, ``{"step": s, name: value, ...}``, appended to ``path`` (as big_vision's
    metrics file): the run's curves without TensorBoard. A resumed run may write a step again; readers keep the last
    line per step (`softalign.workdir.read_scalars`)."""

    def __init__(self, path: str):
        self._path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")

    def write_summaries(self, step: int, values: Mapping[str, Array], metadata: Optional[Mapping[str, Any]] = None):
        """Raw summaries are not scalars: TensorBoard keeps them."""

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]):
        row = {"step": int(step), **{k: _scalar(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(row, allow_nan=True) + "\n")
        self._file.flush()

    def write_images(self, step: int, images: Mapping[str, Array]):
        """Images are TensorBoard's."""

    def write_texts(self, step: int, texts: Mapping[str, str]):
        """Texts are TensorBoard's."""

    def write_hparams(self, hparams: Mapping[str, Any]):
        """The run's config.json holds them."""

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


class MultiWriter:
    """Forwards every call to each of `writers` in order."""

    def __init__(self, writers: Sequence[Any]):
        self._writers = tuple(writers)

    def _each(self, method: str, *args, **kwargs):
        for writer in self._writers:
            getattr(writer, method)(*args, **kwargs)

    def write_summaries(self, step: int, values: Mapping[str, Array], metadata: Optional[Mapping[str, Any]] = None):
        self._each("write_summaries", step, values, metadata)

    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]):
        self._each("write_scalars", step, scalars)

    def write_images(self, step: int, images: Mapping[str, Array]):
        self._each("write_images", step, images)

    def write_texts(self, step: int, texts: Mapping[str, str]):
        self._each("write_texts", step, texts)

    def write_hparams(self, hparams: Mapping[str, Any]):
        self._each("write_hparams", hparams)

    def flush(self):
        self._each("flush")

    def close(self):
        self._each("close")


def create_writers(workdir: str, just_logging: bool) -> MultiWriter:
    """Logging, TensorBoard events and `SCALARS_FILE` (JSON lines) in `workdir`; `just_logging` (non-zero process
    index) keeps the logging alone."""
    writers: list[Any] = [LoggingWriter()]
    if not just_logging:
        writers += [TensorBoardWriter(workdir), JsonlWriter(os.path.join(workdir, SCALARS_FILE))]
    return MultiWriter(writers)


def format_duration(secs: float) -> str:
    """Human-readable duration: '42s', '3m05s', '2h03m', '1d02h'; '?' when unknown."""
    if not np.isfinite(secs) or secs < 0:
        return "?"
    s = int(round(secs))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    mins, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{mins:02d}m"
    return f"{mins}m{s:02d}s" if mins else f"{s}s"


@jax.jit
def _tick(x: jax.Array) -> jax.Array:
    """A trivial computation queued behind earlier work, to wait for the device."""
    return x + 1


class ProgressReporter:
    """TF-free clu ReportProgress: logs rate, percent done and ETA, writes 'steps_per_sec'/'examples_per_sec'.

    Call after each step as `(step, examples=n_this_step)`; a quiet call is one clock read; the first starts it.
    """

    def __init__(self, num_train_steps: Optional[int], writer: Optional[Any] = None, every_steps: Optional[int] = None,
                 every_secs: Optional[float] = 10.0, time_fn: Callable[[], float] = time.monotonic):
        self._num_steps = num_train_steps if num_train_steps and num_train_steps > 0 else None
        self._writer = writer
        self._every_steps = every_steps
        self._every_secs = every_secs
        self._time = time_fn
        self._start_time = time_fn()
        self._last_step: Optional[int] = None
        self._last_time = 0.0
        self._examples = 0
        self._sections: dict[str, float] = collections.defaultdict(float)
        self.last_message: Optional[str] = None

    def __call__(self, step: int, examples: Optional[int] = None) -> bool:
        """Record one call (`examples` processed since the previous call); returns True when it reported."""
        now = self._time()
        if self._last_step is None:
            self._last_step, self._last_time = step, now
            return False
        if examples:
            self._examples += examples
        if step == self._last_step or not (
                (self._every_steps and step // self._every_steps != self._last_step // self._every_steps)
                or (self._every_secs is not None and now - self._last_time >= self._every_secs)
                or step == self._num_steps):
            return False
        self._report(step, now)
        return True

    def _report(self, step: int, now: float):
        """Compute the rates since the last report, write them and log a line."""
        dt = max(now - self._last_time, 1e-9)
        steps_per_sec = (step - self._last_step) / dt
        scalars = {"steps_per_sec": steps_per_sec}
        msg = f"step {step}"
        if self._num_steps:
            eta = (self._num_steps - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
            msg += f"/{self._num_steps} ({100 * step / self._num_steps:.1f}%)"
        msg += f": {steps_per_sec:.3g} steps/s"
        if self._examples:
            scalars["examples_per_sec"] = self._examples / dt
            msg += f", {scalars['examples_per_sec']:.4g} examples/s"
        elapsed = now - self._start_time
        msg += (f", ETA {format_duration(eta)}" if self._num_steps else "") + f"; elapsed {format_duration(elapsed)}"
        if self._sections and elapsed > 0:
            msg += " (" + ", ".join(f"{name} {100 * t / elapsed:.1f}%"
                                    for name, t in sorted(self._sections.items())) + ")"
        logging.info("%s", msg)
        self.last_message = msg
        if self._writer is not None:
            self._writer.write_scalars(step, scalars)
        self._last_step, self._last_time, self._examples = step, now, 0

    @contextlib.contextmanager
    def timed(self, name: str, wait_for_device: bool = False) -> Iterator[None]:
        """Add the block's time to section `name` (logged as a share of elapsed time); `wait_for_device`
        first drains queued JAX work at both ends so async dispatch doesn't shift time between sections."""
        if wait_for_device:
            _tick(np.zeros((), np.float32)).block_until_ready()
        start = self._time()
        try:
            yield
        finally:
            if wait_for_device:
                _tick(np.zeros((), np.float32)).block_until_ready()
            self._sections[name] += self._time() - start

    @property
    def section_times(self) -> dict[str, float]:
        """Seconds accumulated per `timed` section."""
        return dict(self._sections)
