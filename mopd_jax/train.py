"""The training loop: init or restore, steps, evaluation, checkpoints, logging, summary.

What a run builds before its first step is in `mopd_jax.train_setup`, held-out evaluation
in `mopd_jax.evaluation`.

On many processes (`mopd_jax.distributed`) every process runs this same loop: each builds
and verifies only the rows its devices hold, all of them take part in checkpoints, and
process 0 alone writes metrics, progress, `config.json` and `summary.json`.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from mopd_jax import (checkpointing, distributed, evaluation, memory_plan,
                      metrics as metrics_lib, packing, settings, train_setup)

# Tests and benchmarks build a run's parts without its loop as `train.setup(config)`.
setup = train_setup.setup


class _StopFlag:
  """When every process stops: after a signal, at a step they all agree on.

  One process: SIGTERM / SIGINT set a flag that the loop reads after every step.
  Many processes (the signal may reach one host only, or the hosts at different steps),
  without a collective per step:
  - SIGTERM (a scheduler's preemption notice; `launch/local.sh` passes it on) is left to
    JAX's preemption service, which tells every process through the coordination service;
    `reached_preemption_sync_point` then names the same step on all of them, the step
    after the furthest any process had reached (a step or two of latency);
  - SIGINT (and SIGTERM when the preemption service is off) sets the local flag, which the
    processes compare at checkpoint steps only (every step when checkpoints are off), so
    a stop waits for up to `run.checkpoint_every` steps.
  """

  def __init__(self, *, check_every: int):
    self.signum = None
    self.check_every = check_every
    self._previous = {}
    self.preemption_service = (jax.process_count() > 1
                               and jax.config.jax_enable_preemption_service)

  def install(self):
    signals = [signal.SIGINT] + ([] if self.preemption_service else [signal.SIGTERM])
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handler)

  def _handler(self, signum, frame):
    del frame
    self.signum = signum

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def stop_after(self, step: int) -> str | None:
    """Why every process stops after `step` (a log phrase); None to go on. Collective:
    every process calls it after every step."""
    here = None if self.signum is None else signal.Signals(self.signum).name
    if jax.process_count() == 1:
      return None if here is None else f"{here} received"
    if self.preemption_service and multihost_utils.reached_preemption_sync_point(step):
      return "Preemption notice (SIGTERM) received by a process"
    if self.check_every and step % self.check_every:
      return None
    if _any_process(here is not None):
      return f"A signal reached a process ({here or 'another one'})"
    return None


def check_packed_budget(st: settings.Settings, metrics: dict, step: int) -> None:
  """Stops the run when a step's batch did not fit its packed budgets (its update was
  skipped on device): a ConfigError with the budgets that batch needed."""
  if not metrics.get("train/packed_overflow_rows", 0):
    return
  needed = {packing.KNOB: int(metrics["train/packed_tokens_needed"])}
  budgets = {packing.KNOB: st.optim.packed_tokens}
  if st.optim.packed_teacher_tokens:
    needed[packing.TEACHER_KNOB] = int(metrics["train/packed_teacher_tokens_needed"])
    budgets[packing.TEACHER_KNOB] = st.optim.packed_teacher_tokens
  raise settings.ConfigError(packing.overflow_message(needed, budgets, step))


class _LateMetrics:
  """Training metrics read one step late, so the host never waits for the step it has
  just launched: `push` of step k reads and writes step k-1, while step k runs.

  Every step still reaches the metrics file (every `log_every` steps and the last) and
  the progress line. A step's time runs from when the previous step's metrics were read
  (or its own launch, if later) to when its own are: evaluation and checkpoint writes
  between steps are not counted.
  """

  def __init__(self, st: settings.Settings, schedule, host_verifier, writer, progress):
    self.st, self.schedule, self.host_verifier = st, schedule, host_verifier
    self.writer, self.progress = writer, progress
    self.step_times, self.last = [], {}
    self._pending = None  # [step, metrics (device until read), launch time, read?]
    self._last_read = 0.0

  def push(self, step: int, metrics, launched: float):
    """Records the step just launched; reads and writes the one before it."""
    self.flush()
    self._pending = [step, metrics, launched, False]

  def read(self) -> dict:
    """The pending step's metrics on the host (waits for that step)."""
    pending = self._pending
    if not pending[3]:
      step, m = pending[0], jax.device_get(pending[1])
      # The verifier's timing of this step: the next one has been launched but cannot
      # have verified anything yet (it samples first).
      m.update(self.host_verifier.pop_timing())
      now = time.time()
      dt = now - max(pending[2], self._last_read)
      self._last_read = now
      self.step_times.append(dt)
      m["train/lr"] = float(self.schedule(step - 1))
      m["train/step_time_s"] = dt
      if m["train/skipped_nonfinite"]:
        logging.warning("Step %d: non-finite loss or gradient norm (loss=%s, grad_norm=%s);"
                        " the update was skipped.", step, m["train/loss"],
                        m["train/grad_norm"])
      pending[1], pending[3] = m, True
      check_packed_budget(self.st, m, step)
    return pending[1]

  def flush(self):
    """Reads and writes the pending step, if any."""
    if self._pending is None:
      return
    m, step = self.read(), self._pending[0]
    self._pending = None
    if step % self.st.run.log_every == 0 or step == self.st.run.total_steps:
      self.writer.write(step, m)
    self.last = m
    self.progress.update(step, float(m["train/reward_mean"]), float(m["train/loss"]),
                         m["train/step_time_s"])


def run(config, workdir: str) -> dict:
  """Runs training as configured; returns the summary (also written to summary.json)."""
  wall_start = time.time()
  st = config if isinstance(config, settings.Settings) else settings.from_config(config)
  distributed.log_startup(distributed.initialize(st.distributed))
  primary = distributed.is_primary()
  s = train_setup.setup(st)
  os.makedirs(workdir, exist_ok=True)
  if primary:
    _write_json(os.path.join(workdir, "config.json"), settings.to_dict(st))
  compiled, plan, compile_time = _compile_step(s)
  ckpt, state, resume_step = _init_or_restore(s, workdir)
  start_step = int(state.step)
  # s.settings, not st: the step's compile may have chosen the decode layout ('auto').
  evaluator = evaluation.Evaluator(s.settings, s.model_cfg, s.tokenizer, s.eval_batches,
                                   s.host_verifier, s.mesh, s.state_shapes.params)
  writer = metrics_lib.MetricWriter(workdir, resume_step=start_step, active=primary)
  summary_path = os.path.join(workdir, "summary.json")
  eval_before = _evaluate_before(evaluator, state, writer, summary_path,
                                 resumed=resume_step is not None)
  progress = metrics_lib.Progress(st.run.total_steps, active=primary)
  late = _LateMetrics(st, s.schedule, s.host_verifier, writer, progress)
  state, interrupted = _train(s, compiled, state, evaluator, ckpt, late, progress)
  if interrupted:
    _close(s, writer, ckpt)
    return {"interrupted_at_step": int(state.step)}

  eval_after = evaluator(state.params)
  writer.write(int(state.step), eval_after)
  _close(s, writer, ckpt, final_state=state)
  summary = _summary(s, plan, late, state, eval_before=eval_before, eval_after=eval_after,
                     compile_time=compile_time, resume_step=resume_step,
                     wall_time=time.time() - wall_start)
  if primary:
    _write_json(summary_path, summary)
    if os.path.exists(summary_path + ".partial"):
      os.remove(summary_path + ".partial")
  logging.info("Held-out success before %.3f, after %.3f.", summary["eval_success_before"],
               summary["eval_success_after"])
  return summary


def _compile_step(s: train_setup.Setup):
  """(compiled step, memory plan, compile seconds); stops if the plan does not fit.

  Compiled from abstract shapes before any state exists, so a run that cannot fit stops
  here, naming the knobs, instead of failing half-way through allocation.
  """
  compile_start = time.time()
  compiled, plan = s.compile_step()
  compile_time = time.time() - compile_start
  logging.info("Compiled the train step in %.1fs.", compile_time)
  logging.info("%s", plan.table())
  if plan.device_limit is None:
    logging.info("The %s backend reports no memory limit: the plan is not checked.",
                 plan.device_kind)
  memory_plan.check_fits(plan, settings.ConfigError)
  return compiled, plan, compile_time


def _init_or_restore(s: train_setup.Setup, workdir: str):
  """(checkpointer, state, step resumed from or None): the newest intact checkpoint's
  state, or a new one. A damaged latest checkpoint is set aside (logged)."""
  st = s.settings
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    every=st.run.checkpoint_every,
                                    keep=st.run.keep_checkpoints)
  restored = ckpt.restore_latest(checkpointing.abstract_like(s.state_shapes, s.shardings))
  if restored is None:
    return ckpt, s.init_state(), None
  resume_step, state, meta = restored
  logging.info("Resumed from step %d (data position %d).", resume_step,
               meta["data_position"])
  return ckpt, state, resume_step


def _evaluate_before(evaluator, state, writer, summary_path: str, *, resumed: bool) -> dict:
  """The held-out metrics before training: evaluated now, or, on a resumed run, those the
  first start recorded in `summary.json.partial`."""
  previous = {}
  if resumed and os.path.exists(summary_path + ".partial"):
    with open(summary_path + ".partial", encoding="utf-8") as f:
      previous = json.load(f)
  eval_before = previous.get("eval_before")
  # Evaluating is collective: every process follows process 0's record of it.
  if _from_primary(eval_before is None):
    eval_before = evaluator(state.params)
    writer.write(int(state.step), eval_before)
    if distributed.is_primary():
      _write_json(summary_path + ".partial", {"eval_before": eval_before})
  return eval_before


def _train(s: train_setup.Setup, compiled, state, evaluator, ckpt, late, progress):
  """(state, interrupted): the steps from `state.step` to the end, or to a stop signal."""
  st = s.settings
  stop = _StopFlag(check_every=st.run.checkpoint_every)
  stop.install()
  try:
    step = int(state.step)
    while step < st.run.total_steps:
      batch = s.batch(step)  # built while the previous step runs
      launched = time.time()
      state, m = compiled(state, batch)
      step += 1
      late.push(step, m, launched)
      # Evaluation and checkpoints need this step's state, which the next step donates:
      # they come before it is launched.
      if st.run.eval_every and step % st.run.eval_every == 0 and step < st.run.total_steps:
        late.read().update(evaluator(state.params))
      reason = stop.stop_after(step)
      if ckpt.should_save(step) or reason:
        late.flush()  # a step is in metrics.jsonl before its checkpoint can exist
        ckpt.save(step, state, {"data_position": step, "seed": st.run.seed})
      if reason:
        logging.warning("%s: saved step %d, stopping.", reason, step)
        return state, True
    late.flush()
  finally:
    stop.restore()
    progress.close()
  return state, False


def _summary(s: train_setup.Setup, plan, late, state, *, eval_before, eval_after,
             compile_time, resume_step, wall_time) -> dict:
  """The run's summary (`summary.json`)."""
  return {
      "steps": int(state.step),
      "eval_success_before": eval_before["eval/success_rate"],
      "eval_success_after": eval_after["eval/success_rate"],
      "eval_before": eval_before,
      "eval_after": eval_after,
      "compile_time_s": compile_time,
      "step_time_median_s": (statistics.median(late.step_times) if late.step_times
                             else None),
      "wall_time_s": wall_time,
      "resumed_from_step": resume_step,
      "data": {"train": s.train_batches.report, "heldout": s.eval_batches.report,
               "load": {"train": s.train_batches.split.meta.get("load"),
                        "heldout": s.eval_batches.split.meta.get("load")}},
      "final_train_metrics": {k: metrics_lib.to_python(v) for k, v in late.last.items()},
      "device": f"{s.mesh.size} x {s.mesh.devices.flat[0].device_kind}",
      "memory_plan": plan.as_dict(),
      "processes": jax.process_count(),
      # This process's rows whose feedback was cut at config.peers.feedback_len tokens
      # (since this process started).
      "feedback_cut_rows": s.host_verifier.feedback_cut_rows,
      # This process's rows that shared the result of an identical response in their
      # verification call (config.verifier.dedupe).
      "duplicate_rows": s.host_verifier.duplicate_rows,
  }


def _close(s: train_setup.Setup, writer, ckpt, final_state=None):
  """Closes the metric writer, saves `final_state` (a finished run's) and closes the
  checkpointer, which waits for the last save: the metrics are on disk first."""
  writer.close()
  if final_state is not None:
    step = int(final_state.step)
    ckpt.save(step, final_state, {"data_position": step, "seed": s.settings.run.seed})
  ckpt.close()
  _log_verified(s.host_verifier)


def _log_verified(host_verifier):
  logging.info("Process %d verified %d rows in %d calls (rows that shared an identical "
               "response's result: %d; feedback cut: %d rows).", jax.process_index(),
               host_verifier.rows, host_verifier.calls, host_verifier.duplicate_rows,
               host_verifier.feedback_cut_rows)


def _from_primary(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def _any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any (a signal may reach one host only,
  or the hosts at different steps; all of them must save and stop at the same step)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.process_allgather(np.int32(flag)).max())


def _write_json(path, obj):
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, default=metrics_lib.to_python)
  os.replace(tmp, path)
