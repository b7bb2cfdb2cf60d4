"""Tests for softalign.training.writers: event files readable without TensorFlow, logging lines, progress rates."""

from __future__ import annotations

import glob
import logging
import os
import struct
import time

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from softalign.training.writers import (
    JsonlWriter,
    LoggingWriter,
    MultiWriter,
    ProgressReporter,
    TensorBoardWriter,
    create_writers,
    format_duration,
)
from softalign.workdir import SCALARS_FILE, read_scalars

# ----------------------------------------------------------------------------- event file reader


def _crc32c(data: bytes) -> int:
    """Bitwise CRC-32C (Castagnoli), independent of tensorboardX's implementation."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    """TFRecord's masked CRC."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(logdir: str) -> list[event_pb2.Event]:
    """Parse every TFRecord in the logdir's event files (u64 length, crc, data, crc) into Event protos."""
    events = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
            payload = data[pos + 12:pos + 12 + length]
            (payload_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
            assert header_crc == _masked(_crc32c(header)) and payload_crc == _masked(_crc32c(payload))
            event = event_pb2.Event()
            event.ParseFromString(payload)
            events.append(event)
            pos += 16 + length
    return events


def _values(events):
    """(step, tag, summary value) for every summary value in the events."""
    return [(e.step, v.tag, v) for e in events if e.HasField("summary") for v in e.summary.value]


# ----------------------------------------------------------------------------- writers


def test_tensorboard_writer_scalars_round_trip(tmp_path):
    writer = TensorBoardWriter(str(tmp_path))
    writer.write_scalars(3, {"train/loss": jnp.float32(2.5), "lr": np.float64(1e-3)})
    writer.write_scalars(4, {"train/loss": np.array(1.25), "count": np.int64(7)})
    writer.close()
    events = read_events(str(tmp_path))
    assert events[0].file_version.startswith("brain.Event")
    scalars = {(step, tag): v.simple_value for step, tag, v in _values(events)}
    assert scalars[(3, "train/loss")] == 2.5
    assert scalars[(4, "train/loss")] == 1.25
    assert scalars[(4, "count")] == 7.0
    assert scalars[(3, "lr")] == pytest.approx(1e-3)


def test_tensorboard_writer_other_kinds(tmp_path):
    writer = TensorBoardWriter(str(tmp_path))
    writer.write_images(1, {"rgb": np.random.rand(2, 4, 4, 3).astype(np.float32),
                            "gray": np.zeros((4, 4, 1), np.uint8)})
    writer.write_texts(1, {"note": "hello"})
    writer.write_hparams({"lr": 0.1, "model": "vit", "layers": np.int32(4), "schedule": [1, 2], "off": None})
    writer.write_summaries(2, {"raw": np.arange(3, dtype=np.float32)})
    writer.flush()
    writer.close()
    values = _values(read_events(str(tmp_path)))
    by_tag = {tag: v for _, tag, v in values}
    assert by_tag["rgb"].image.encoded_image_string.startswith(b"\x89PNG")
    assert by_tag["rgb"].image.height == 4 and by_tag["rgb"].image.width == 8  # Two images side by side.
    assert by_tag["gray"].image.encoded_image_string.startswith(b"\x89PNG")
    assert by_tag["note/text_summary"].tensor.string_val == [b"hello"]
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(by_tag)
    raw = by_tag["raw"].tensor
    np.testing.assert_array_equal(np.frombuffer(raw.tensor_content, np.float32), [0, 1, 2])


def test_create_writers_just_logging_skips_event_files(tmp_path):
    quiet = create_writers(str(tmp_path / "p1"), just_logging=True)
    quiet.write_scalars(1, {"x": 1.0})
    quiet.close()
    assert not (tmp_path / "p1").exists() or not os.listdir(tmp_path / "p1")
    loud = create_writers(str(tmp_path / "p0"), just_logging=False)
    loud.write_scalars(1, {"x": 1.0})
    loud.close()
    assert [tag for _, tag, _ in _values(read_events(str(tmp_path / "p0")))] == ["x"]
    assert read_scalars(str(tmp_path / "p0" / SCALARS_FILE)) == {1: {"x": 1.0}}


def test_jsonl_writer_round_trip_resume_and_torn_line(tmp_path):
    path = str(tmp_path / "run" / SCALARS_FILE)
    writer = JsonlWriter(path)
    writer.write_scalars(50, {"train/loss": jnp.float32(2.5), "lr": np.float64(1e-3)})
    writer.write_scalars(50, {"eval/heldout/i2t_R@5": 0.25})
    writer.write_scalars(100, {"train/loss": 2.0})
    writer.write_images(100, {"img": np.zeros((1, 2, 2, 3))})  # ignored, not an error
    writer.close()
    again = JsonlWriter(path)  # a resumed run appends; its redo of step 100 wins
    again.write_scalars(100, {"train/loss": 1.5})
    again.close()
    with open(path, "a") as f:
        f.write('{"step": 150, "train/lo')  # a run killed mid-line
    assert read_scalars(path) == {50: {"train/loss": 2.5, "lr": 1e-3, "eval/heldout/i2t_R@5": 0.25},
                                  100: {"train/loss": 1.5}}
    assert read_scalars(str(tmp_path / "missing.jsonl")) == {}


def test_logging_writer_compact_line(caplog):
    caplog.set_level(logging.INFO, logger="absl")
    LoggingWriter().write_scalars(100, {"loss": jnp.float32(0.6931472), "step": np.int64(5), "lr": 1e-3})
    assert "[100] loss=0.693147, step=5, lr=0.001" in caplog.text


class _Recorder:
    """A fake MetricWriter that records calls."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def test_multi_writer_forwards_everything():
    a, b = _Recorder(), _Recorder()
    multi = MultiWriter([a, b])
    multi.write_scalars(1, {"x": 1})
    multi.write_texts(2, {"t": "hi"})
    multi.write_summaries(3, {"raw": np.zeros(3)}, None)
    multi.flush()
    multi.close()
    names = [c[0] for c in a.calls]
    assert names == ["write_scalars", "write_texts", "write_summaries", "flush", "close"]
    assert a.calls == b.calls and a.calls[1][1] == (2, {"t": "hi"})


# ----------------------------------------------------------------------------- progress


class _Clock:
    """A settable fake clock."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class _ScalarSink:
    def __init__(self):
        self.written = []

    def write_scalars(self, step, scalars):
        self.written.append((step, dict(scalars)))


def test_progress_rate_and_eta_with_fake_clock():
    clock, sink = _Clock(), _ScalarSink()
    report = ProgressReporter(1000, sink, every_secs=10, time_fn=clock)
    assert not report(0)  # First call only starts the clock.
    fired = []
    for step in range(1, 41):
        clock.t = 0.5 * step  # 2 steps/s, 32 examples per step.
        if report(step, examples=32):
            fired.append(step)
    assert fired == [20, 40]
    step, scalars = sink.written[0]
    assert step == 20
    assert scalars["steps_per_sec"] == pytest.approx(2.0)
    assert scalars["examples_per_sec"] == pytest.approx(64.0)
    assert "step 40/1000 (4.0%)" in report.last_message
    assert "ETA 8m00s" in report.last_message  # 960 steps left at 2 steps/s.


def test_progress_every_steps_final_step_and_sections():
    clock, sink = _Clock(), _ScalarSink()
    report = ProgressReporter(250, sink, every_steps=100, every_secs=None, time_fn=clock)
    report(0)
    for step in range(1, 251):
        clock.t += 0.1
        if step == 150:
            with report.timed("eval"):
                clock.t += 5.0
        report(step)
    assert [s for s, _ in sink.written] == [100, 200, 250]
    assert sink.written[1][1]["steps_per_sec"] == pytest.approx(100 / 15.0)
    assert "examples_per_sec" not in sink.written[0][1]
    assert report.section_times == {"eval": pytest.approx(5.0)}
    assert "(eval 16.7%)" in report.last_message  # 5 s of 30 s elapsed.
    assert "ETA 0s" in report.last_message
    with report.timed("checkpoint", wait_for_device=True):  # Drains the JAX queue at both ends.
        clock.t += 1.0
    assert report.section_times["checkpoint"] == pytest.approx(1.0)


def test_progress_is_cheap_when_not_firing():
    report = ProgressReporter(10**9, None, every_secs=3600)
    start = time.perf_counter()
    for step in range(20000):
        report(step, examples=8)
    assert time.perf_counter() - start < 1.0


def test_format_duration():
    assert format_duration(42.4) == "42s"
    assert format_duration(185) == "3m05s"
    assert format_duration(2 * 3600 + 3 * 60 + 10) == "2h03m"
    assert format_duration(86400 + 2 * 3600) == "1d02h"
    assert format_duration(float("inf")) == "?"
