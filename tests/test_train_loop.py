"""The loop's metric reading: one step late, every step still written, in order."""

import types

import numpy as np

from mopd_jax import train


class _Metric:
  """A device value that records when the host reads it."""

  def __init__(self, name, step, reads):
    self.name, self.step, self.reads = name, step, reads

  def __array__(self, dtype=None, copy=None):
    del copy
    self.reads.append((self.step, self.name))
    return np.asarray(float(self.step), dtype)


class _Writer:

  def __init__(self):
    self.rows = []

  def write(self, step, metrics):
    self.rows.append((step, dict(metrics)))


class _Progress:

  def __init__(self):
    self.steps = []

  def update(self, step, reward, loss, step_time):
    del reward, loss, step_time
    self.steps.append(step)


class _Verifier:

  def pop_timing(self):
    return {"verify/host_time_s": 0.0}


def _metrics(step, reads):
  return {name: _Metric(name, step, reads) for name in
          ("train/reward_mean", "train/loss", "train/skipped_nonfinite", "train/grad_norm")}


def test_a_step_is_read_only_once_the_next_is_launched():
  st = types.SimpleNamespace(run=types.SimpleNamespace(log_every=2, total_steps=3))
  writer, progress, reads = _Writer(), _Progress(), []
  late = train._LateMetrics(st, lambda step: 0.1 * step, _Verifier(), writer, progress)
  late.push(1, _metrics(1, reads), launched=0.0)
  assert not reads and not progress.steps  # step 1 runs; the host goes on
  late.push(2, _metrics(2, reads), launched=0.0)
  assert {step for step, _ in reads} == {1} and progress.steps == [1]
  assert writer.rows == []  # log_every = 2
  late.read()["eval/extra"] = 7.0  # e.g. an evaluation after step 2, in step 2's record
  assert {step for step, _ in reads} == {1, 2} and progress.steps == [1]
  late.push(3, _metrics(3, reads), launched=0.0)
  assert progress.steps == [1, 2] and {step for step, _ in reads} == {1, 2}
  late.flush()
  late.flush()  # nothing pending: no-op
  assert progress.steps == [1, 2, 3]
  assert [step for step, _ in writer.rows] == [2, 3]  # every log_every-th, and the last
  two = writer.rows[0][1]
  assert two["eval/extra"] == 7.0 and two["train/loss"] == 2.0
  assert np.isclose(two["train/lr"], 0.1) and "train/step_time_s" in two
  assert len(late.step_times) == 3 and late.last["train/loss"] == 3.0
