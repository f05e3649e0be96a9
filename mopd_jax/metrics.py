"""Metric writers: JSONL (one object per logged step), TensorBoard events, progress.

`metrics.jsonl` lines are `{"step": s, "<name>": value, ...}`. On resume, lines of steps
after the restored checkpoint are dropped first, so the file reads as one run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np

from mopd_jax import tb_events


def to_python(value):
  """Scalar numpy / jax value -> float or int (NaN and inf kept as floats)."""
  value = np.asarray(value)
  if value.dtype.kind in "iub":
    return int(value)
  return float(value)


class MetricWriter:
  """active=False (every process but the first of a multi-process run): writes nothing."""

  def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True,
               active: bool = True):
    self.active = active
    if not active:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._truncate_after(resume_step)
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = None
    if tensorboard:
      self._tb = tb_events.EventWriter(os.path.join(workdir, "tensorboard"))

  def _truncate_after(self, step: int):
    if not os.path.exists(self.path):
      return
    with open(self.path, encoding="utf-8") as f:
      kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(self.path, "w", encoding="utf-8") as f:
      f.writelines(kept)

  def write(self, step: int, metrics: dict):
    if not self.active:
      return
    record = {"step": int(step)}
    record.update({k: to_python(v) for k, v in sorted(metrics.items())})
    # JSON has no NaN: write it as null so every line stays valid JSON.
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
             for k, v in record.items()}
    self._file.write(json.dumps(clean) + "\n")
    self._file.flush()
    if self._tb is not None:
      self._tb.scalars(step, {k: v for k, v in record.items()
                              if k != "step" and isinstance(v, (int, float))
                              and math.isfinite(v)})
      self._tb.flush()

  def close(self):
    if not self.active:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """One-line progress: step, reward, loss, step time; redrawn on a terminal."""

  def __init__(self, total: int, stream=sys.stderr, *, active: bool = True):
    self.active = active
    self.total = total
    self.stream = stream
    self.tty = stream.isatty()
    self.start = time.time()

  def update(self, step: int, reward: float, loss: float, step_time: float):
    if not self.active:
      return
    elapsed = time.time() - self.start
    width = 24
    filled = int(width * step / max(self.total, 1))
    line = (f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.total} "
            f"reward {reward:.3f} loss {loss:.4f} {step_time:.2f}s/step "
            f"elapsed {elapsed:.0f}s")
    if self.tty:
      self.stream.write("\r" + line)
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def close(self):
    if not self.active:
      return
    if self.tty:
      self.stream.write("\n")
    self.stream.flush()
