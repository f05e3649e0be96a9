"""TensorBoard event files (`mopd_jax.tb_events`) read back with TensorFlow's reader, which
checks every record's CRC; the JSONL metrics on resume."""

import glob
import math
import os

import pytest

from mopd_jax import metrics, tb_events


def test_crc32c_check_value():
  assert tb_events.crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check
  assert tb_events.crc32c(b"") == 0


def test_events_read_back_with_tensorflow(tmp_path):
  tf = pytest.importorskip("tensorflow")
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(1, {"train/loss": 0.25, "train/reward_mean": 0.5, "count": 3,
                   "bad": float("nan")})
  writer.write(2 ** 40, {"train/loss": -1.5e-3})
  writer.close()
  files = glob.glob(os.path.join(tmp_path, "tensorboard", "events.out.tfevents.*"))
  assert len(files) == 1
  events = list(tf.compat.v1.train.summary_iterator(files[0]))
  assert events[0].file_version == "brain.Event:2"
  got = [(e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in events[1:]]
  assert got == [(1, {"train/loss": 0.25, "train/reward_mean": 0.5, "count": 3.0}),
                 (2 ** 40, {"train/loss": pytest.approx(-1.5e-3)})]
  assert all(math.isclose(e.wall_time, events[0].wall_time, abs_tol=60) for e in events)


def test_a_corrupt_record_is_refused_by_the_reader(tmp_path):
  tf = pytest.importorskip("tensorflow")
  path = tmp_path / "events.out.tfevents.bad"
  data = bytearray(tb_events.record(tb_events.event(1.0, 7, scalars={"x": 1.0})))
  data[-6] ^= 0xFF  # a byte of the event, so its CRC no longer matches
  path.write_bytes(bytes(data))
  with pytest.raises(Exception, match="(?i)corrupt|crc|checksum"):
    list(tf.compat.v1.train.summary_iterator(str(path)))


def test_resume_drops_metrics_after_the_restored_step(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
  for step in range(1, 5):
    writer.write(step, {"loss": float(step)})
  writer.close()
  writer = metrics.MetricWriter(str(tmp_path), resume_step=2, tensorboard=False)
  writer.write(3, {"loss": 30.0})
  writer.close()
  rows = metrics.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 30.0)]
