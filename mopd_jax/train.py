"""The training loop: init or restore, steps, evaluation, checkpoints, logging, summary.

On many processes (`mopd_jax.distributed`) every process runs this same loop: each builds
and verifies only the rows its devices hold, all of them take part in checkpoints, and
process 0 alone writes metrics, progress, `config.json` and `summary.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import statistics
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from mopd_jax import (checkpointing, demo_base, distributed, memory_plan,
                      metrics as metrics_lib, packing, peer_context, settings, sharding,
                      teacher, tokenizers, train_step)
from mopd_jax.data import pipeline
from mopd_jax.models import attention as attention_lib, presets, transformer
from mopd_jax.sampling import Sampler
from mopd_jax.verifiers import callback, choice, code, math as math_verifier, tooluse


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
  if n - c < k:
    return 1.0
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_k_sizes(n: int) -> tuple:
  """The k of the pass@k metrics for n samples: 1, 2, 4, ... up to n, and n itself."""
  return tuple(sorted({1 << i for i in range(n.bit_length()) if 1 << i <= n} | {n}))


def eval_metrics(rewards, status, sources, *, num_samples: int, threshold: float) -> dict:
  """Held-out metrics over all problems and per source (a pure function of host arrays).

  Args:
    rewards: float [P * n], the n = `num_samples` rollouts of each problem in a row.
    status: int [P * n], verifier status codes (`callback.STATUS_CODES`).
    sources: str [P], the source name of each problem.
    num_samples: n.
    threshold: a rollout succeeds when its reward is >= threshold.

  Returns:
    `eval/mean@n` (mean reward), `eval/pass@k` (unbiased, averaged over problems) for k in
    `pass_at_k_sizes(n)`, `eval/success_rate`, `eval/verifier_errors`, and per source
    `eval/<source>/mean@n`, `eval/<source>/pass@k` and `eval/<source>/num_problems`.
  """
  n = num_samples
  rewards = np.asarray(rewards, np.float64).reshape(-1, n)
  sources = np.asarray(sources, dtype=str)
  if len(sources) != len(rewards):
    raise ValueError(f"{len(sources)} source names for {len(rewards)} problems of "
                     f"{n} rollouts each.")
  correct = (rewards >= threshold).sum(1)

  def group(prefix, rows):
    out = {f"{prefix}mean@{n}": float(rewards[rows].mean())}
    for k in pass_at_k_sizes(n):
      out[f"{prefix}pass@{k}"] = float(np.mean([pass_at_k(n, int(c), k)
                                                for c in correct[rows]]))
    return out

  out = group("eval/", slice(None))
  out["eval/success_rate"] = float(correct.sum() / rewards.size)
  out["eval/verifier_errors"] = int((np.asarray(status) == callback.STATUS_CODES["error"]).sum())
  for name in sorted(set(sources.tolist())):
    rows = sources == name
    out.update(group(f"eval/{name}/", rows))
    out[f"eval/{name}/num_problems"] = int(rows.sum())
  return out


class Evaluator:
  """Held-out evaluation through the split pipeline: jit(sample) -> host verify.

  The same prompts and the same sampling key every time, so before/after numbers differ
  only through the parameters. Prompts are split over the mesh like training batches;
  each process verifies the rollouts of its own rows, and the per-row results (with the
  example ids, which name each problem's source) are gathered so every process computes
  the same metrics (`eval_metrics`).
  """

  def __init__(self, st: settings.Settings, model_cfg, tok, batches, host_verifier, mesh,
               param_shapes):
    e = st.eval
    self.sampler = Sampler(model=model_cfg, max_new_tokens=st.sampling.max_response_len,
                           stop_ids=tuple(tok.stop_ids), pad_id=tok.pad_id,
                           temperature=e.temperature, top_k=e.top_k, top_p=e.top_p,
                           num_samples=e.num_samples,
                           decode_layers=st.sampling.decode_layers,
                           decode_layout=st.sampling.decode_layout)
    local = batches.first(e.num_prompts, sharding.process_rows(mesh, e.num_prompts))
    self.local_ids = local["example_id"]
    self.sources = batches.split.source_table()
    self.batch = sharding.global_batch(mesh, local, e.num_prompts)
    self.k = e.num_samples
    self.host = host_verifier
    self.threshold = st.verifier.success_threshold
    key = jax.random.fold_in(jax.random.PRNGKey(st.run.seed), 1_000_003)
    self.key = jax.make_array_from_process_local_data(sharding.replicated(mesh),
                                                      np.asarray(key))
    out_shapes = jax.eval_shape(self.sampler.__call__, param_shapes,
                                self.batch["prompt_tokens"], self.batch["prompt_mask"],
                                self.key)
    self._sample = sharding.UnderRules(jax.jit(
        self.sampler.__call__, out_shardings=jax.tree.map(
            lambda x: sharding.batch_sharding(mesh, x.ndim), out_shapes)), mesh)

  def __call__(self, params) -> dict:
    out = self._sample(params, self.batch["prompt_tokens"], self.batch["prompt_mask"],
                       self.key)
    ids = np.repeat(self.local_ids, self.k)
    rewards, status, _, _ = self.host(ids, sharding.local_rows(out.tokens),
                                      sharding.local_rows(out.lengths))
    self.host.pop_timing()  # evaluation is not part of a training step's statistics
    if jax.process_count() > 1:
      # Each block holds whole groups of k rows, so the metrics below do not depend on
      # the order of the blocks; the ids travel with them and name each group's source.
      rewards, status, ids = multihost_utils.process_allgather(
          (rewards, status, np.asarray(ids, np.int32)), tiled=True)
    sources = [self.sources[int(i)] for i in np.asarray(ids)[::self.k]]
    return eval_metrics(rewards, status, sources, num_samples=self.k,
                        threshold=self.threshold)


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


@dataclasses.dataclass
class Setup:
  """Everything a run builds before its first step (also used by tests and benchmarks)."""

  settings: settings.Settings
  mesh: Any
  tokenizer: Any
  model_cfg: transformer.ModelConfig
  step_cfg: train_step.StepConfig
  optimizer: Any
  schedule: Any
  base_params: Any
  external_teacher_params: Any  # None for a self-teacher
  state_shapes: Any
  shardings: Any
  train_batches: pipeline.PromptBatches
  eval_batches: pipeline.PromptBatches
  host_verifier: callback.HostVerifier
  pieces: peer_context.TemplatePieces

  def init_state(self):
    """The initial TrainState, created directly on its shardings."""
    param_dtype = transformer.dtype_from_name(self.model_cfg.param_dtype)
    optimizer = self.optimizer

    def init(params, external_teacher):
      params = jax.tree.map(lambda x: x.astype(param_dtype), params)
      return train_step.TrainState(
          step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
          teacher_params=(teacher.init_teacher(params) if external_teacher is None
                          else external_teacher),
          rng=jax.random.PRNGKey(self.settings.run.seed))

    return jax.jit(init, out_shardings=self.shardings)(self.base_params,
                                                       self.external_teacher_params)

  def train_step(self):
    return train_step.make_train_step(self.step_cfg, self.mesh, self.host_verifier,
                                      self.optimizer, self.pieces, self.shardings)

  def batch(self, step: int):
    """The global batch at `step`; this process builds only the rows its devices hold."""
    n = self.settings.data.batch_size
    local = self.train_batches.batch(step, sharding.process_rows(self.mesh, n))
    return sharding.global_batch(self.mesh, local, n)

  def put_batch(self, batch):
    """A whole host batch as global arrays (each process keeps its own rows)."""
    n = len(batch["example_id"])
    rows = sharding.process_rows(self.mesh, n)
    return sharding.global_batch(self.mesh, jax.tree.map(lambda x: x[rows], batch), n)

  def abstract_inputs(self):
    """(state, batch) of the step as ShapeDtypeStructs on their shardings."""
    st = self.settings
    shape = (st.data.batch_size, st.data.max_prompt_len)
    shardings = train_step.batch_shardings(self.mesh)
    batch = {"prompt_tokens": jax.ShapeDtypeStruct(shape, jnp.int32),
             "prompt_mask": jax.ShapeDtypeStruct(shape, jnp.bool_),
             "insert_index": jax.ShapeDtypeStruct(shape[:1], jnp.int32),
             "example_id": jax.ShapeDtypeStruct(shape[:1], jnp.int32)}
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
             for k, v in batch.items()}
    return checkpointing.abstract_like(self.state_shapes, self.shardings), batch

  def compile_step(self):
    """The compiled fused step and its memory plan, from abstract shapes only."""
    compiled = self.train_step().lower(*self.abstract_inputs()).compile()
    st = self.settings
    # With summaries, the student's prompts carry the summary instruction too.
    extra = len(self.pieces.summary_pieces()[0]) if st.peers.summaries else 0
    kv = memory_plan.kv_cache_bytes(
        self.model_cfg, prompts=st.data.batch_size, rows=st.rows,
        prompt_len=st.data.max_prompt_len + extra,
        response_len=st.sampling.max_response_len,
        batch_devices=sharding.batch_divisor(self.mesh))
    layout = st.sampling.decode_layout
    plan = memory_plan.make_plan(
        compiled, self.state_shapes, self.shardings, kv, self.mesh.devices.flat[0],
        decode_weights=memory_plan.decode_weight_bytes(
            self.model_cfg, self.state_shapes.params, self.mesh, layout),
        decode_layout=layout)
    return compiled, plan


def _load_model(st: settings.Settings, mesh):
  """(model config, params, tokenizer, data cache dir, SentencePiece path or None)."""
  if st.model.checkpoint == "demo":
    base_dir = st.model.cache_dir or demo_base.default_dir()
    model_cfg, params, tok = _primary_first(lambda: demo_base.ensure(base_dir))
    return (model_cfg, params, tok, st.data.cache_dir or os.path.join(base_dir, "data"),
            os.path.join(base_dir, "tokenizer.model"))
  from mopd_jax.models import hf_import  # pylint: disable=import-outside-toplevel
  path = st.model.checkpoint
  model_cfg, params = hf_import.load(path, dtype=st.model.param_dtype, mesh=mesh)
  if st.model.preset:
    _check_preset(st.model.preset, model_cfg, path)
  tok = tokenizers.HFTokenizer(path)
  if not st.data.cache_dir:
    raise settings.ConfigError(
        "config.data.cache_dir is required with a Hugging Face checkpoint: the prompts "
        "are tokenised with its tokenizer into that directory.")
  return model_cfg, params, tok, st.data.cache_dir, None


def _check_preset(name, loaded, path):
  """The checkpoint must have the shapes of the preset the config was written for."""
  expected = presets.get(name)
  fields = ("vocab_size", "num_layers", "embed_dim", "num_heads", "num_kv_heads", "head_dim",
            "mlp_dim", "tie_embeddings")
  diff = {f: (getattr(expected, f), getattr(loaded, f)) for f in fields
          if getattr(expected, f) != getattr(loaded, f)}
  if diff:
    raise settings.ConfigError(
        f"Checkpoint {path!r} does not have the shapes of preset {name!r}: "
        + ", ".join(f"{k} preset={a} checkpoint={b}" for k, (a, b) in diff.items())
        + ". Set --config.model.preset='' to skip this check.")


def _load_external_teacher(st: settings.Settings, mesh, student_cfg):
  if st.teacher.mode != "external":
    return None, None
  from mopd_jax.models import hf_import  # pylint: disable=import-outside-toplevel
  teacher_cfg, params = hf_import.load(st.teacher.checkpoint,
                                       dtype=st.teacher.param_dtype, mesh=mesh)
  if teacher_cfg.vocab_size != student_cfg.vocab_size:
    raise settings.ConfigError(
        f"The external teacher's vocabulary ({teacher_cfg.vocab_size} tokens, "
        f"{st.teacher.checkpoint}) differs from the student's "
        f"({student_cfg.vocab_size} tokens): teacher and student must share a vocabulary.")
  return st.model.model_config(teacher_cfg, external_teacher=True), params


def domain_score_batch(domain: str, vs: settings.VerifierSettings):
  """(texts, references) -> list[Result] of the verifier of `domain`, as configured."""
  if domain == "code":
    # The code verifier's process-wide sandbox pool, with this run's budget per response.
    pool = code.default_pool(vs.max_workers)
    pool.set_limits(dataclasses.replace(pool.limits, memory_bytes=vs.memory_bytes))
    return lambda texts, refs: code.score_batch(
        texts, refs, max_workers=vs.max_workers, time_limit_s=vs.time_limit_s,
        deadline_s=vs.batch_deadline_s)
  if domain == "math":
    return lambda texts, refs: math_verifier.score_batch(texts, refs,
                                                         max_workers=vs.max_workers)
  return {"choice": choice.score_batch, "tooluse": tooluse.score_batch}[domain]


def setup(config, *, score_batch=None, devices=None) -> Setup:
  """Validates `config` and builds mesh, model, data, verifier and state shardings.

  config: a run ConfigDict (validated into `settings.Settings` here) or the Settings.

  score_batch: (texts, references) -> list[Result]; defaults to the verifier of the
  data's domain (the code verifier for the demo).
  """
  st = config if isinstance(config, settings.Settings) else settings.from_config(config)

  # ---------------------------------------------------------------- Mesh.
  try:
    mesh = sharding.make_mesh(st.mesh.shape, devices, dcn_shape=st.mesh.dcn_shape)
  except ValueError as e:
    raise settings.ConfigError(
        f"config.mesh.shape = {st.mesh.shape} with config.mesh.dcn_shape = "
        f"{st.mesh.dcn_shape} does not fit the {len(devices or jax.devices())} devices "
        f"of {jax.process_count()} process(es): {e}") from e
  divisor = sharding.batch_divisor(mesh)
  for key, prompts in (("data.batch_size", st.data.batch_size),
                       ("eval.num_prompts", st.eval.num_prompts)):
    if prompts % divisor:
      raise settings.ConfigError(
          f"config.{key}={prompts} must be divisible by the data x fsdp mesh size "
          f"{divisor} (mesh {dict(mesh.shape)}).")
  mb = st.optim.micro_batch_rows
  if mb and mb < st.rows and mb % divisor:
    raise settings.ConfigError(
        f"config.optim.micro_batch_rows={mb} must be divisible by the data x fsdp mesh "
        f"size {divisor} (mesh {dict(mesh.shape)}), so that every micro-batch keeps rows "
        "on every device.")
  logging.info("Mesh %s over %d %s devices.", dict(mesh.shape), mesh.size,
               mesh.devices.flat[0].platform)
  try:
    attention_lib.check_backend(st.model.attention, mesh.devices.flat[0].platform)
  except ValueError as e:
    raise settings.ConfigError(str(e)) from e

  # ---------------------------------------------------------------- Models and tokenizer.
  base_cfg, base_params, tok, cache_dir, _ = _load_model(st, mesh)
  model_cfg = st.model.model_config(base_cfg)
  teacher_cfg, teacher_params = _load_external_teacher(st, mesh, model_cfg)

  # ---------------------------------------------------------------- Data.
  def load_splits():
    if st.data.task == "demo_code":
      # The TF-free tokenisation: the demo's path imports no TensorFlow.
      return tuple(pipeline.load_split(cache_dir, n, None, tok)
                   for n in ("train", "heldout"))
    splits = pipeline.load_source_splits(cache_dir, st.data, tok)
    return splits["train"], splits["heldout"]
  train_split, heldout_split = _primary_first(load_splits)
  train_batches = pipeline.PromptBatches(
      train_split, batch_size=st.data.batch_size, max_prompt_len=st.data.max_prompt_len,
      seed=st.run.seed, pad_id=tok.pad_id, overlong=st.data.overlong)
  eval_batches = pipeline.PromptBatches(
      heldout_split, batch_size=st.eval.num_prompts, max_prompt_len=st.data.max_prompt_len,
      seed=st.run.seed, pad_id=tok.pad_id, overlong=st.data.overlong)
  references = {**train_split.reference_table(), **heldout_split.reference_table()}
  if score_batch is None:
    score_batch = domain_score_batch(train_split.meta.get("domain", "code"), st.verifier)
  host_verifier = callback.HostVerifier(score_batch, references, tok,
                                        feedback_len=st.peers.feedback_room,
                                        summary_len=st.peers.summary_len,
                                        summary_fallback_chars=st.peers.summary_fallback_chars,
                                        share_texts=st.peers.summaries)

  # ---------------------------------------------------------------- Shardings.
  optimizer, schedule = train_step.make_optimizer(st.optim)
  param_dtype = transformer.dtype_from_name(model_cfg.param_dtype)
  param_shapes = jax.eval_shape(
      lambda: jax.tree.map(lambda x: jnp.asarray(x, param_dtype), base_params))
  param_shardings = sharding.logical_to_shardings(
      transformer.param_logical_axes(model_cfg), param_shapes, mesh)
  teacher_shardings = None
  if teacher_params is not None:
    teacher_shardings = sharding.logical_to_shardings(
        transformer.param_logical_axes(teacher_cfg), jax.eval_shape(lambda: teacher_params),
        mesh)
  state_shapes = jax.eval_shape(lambda p, t: train_step.TrainState(
      step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
      teacher_params=teacher.init_teacher(p) if t is None else t,
      rng=jax.random.PRNGKey(0)), param_shapes, teacher_params)
  shardings = train_step.state_shardings(state_shapes, param_shardings, mesh, optimizer,
                                         teacher_shardings)
  step_cfg = train_step.StepConfig.from_settings(st, model_cfg, tok, teacher_cfg)
  return Setup(settings=st, mesh=mesh, tokenizer=tok, model_cfg=model_cfg, step_cfg=step_cfg,
               optimizer=optimizer, schedule=schedule,
               base_params=jax.device_put(base_params, param_shardings),
               external_teacher_params=(None if teacher_params is None else
                                        jax.device_put(teacher_params, teacher_shardings)),
               state_shapes=state_shapes, shardings=shardings,
               train_batches=train_batches, eval_batches=eval_batches,
               host_verifier=host_verifier, pieces=peer_context.tokenize_pieces(tok))


def run(config, workdir: str) -> dict:
  """Runs training as configured; returns the summary (also written to summary.json)."""
  wall_start = time.time()
  st = config if isinstance(config, settings.Settings) else settings.from_config(config)
  startup = distributed.initialize(st.distributed)
  distributed.log_startup(startup)
  primary = distributed.is_primary()
  s = setup(st)
  os.makedirs(workdir, exist_ok=True)
  if primary:
    _write_json(os.path.join(workdir, "config.json"), settings.to_dict(st))

  # ---------------------------------------------------------------- Step and memory plan.
  # Compiled from abstract shapes before any state exists, so a run that cannot fit
  # stops here, naming the knobs, instead of failing half-way through allocation.
  compile_start = time.time()
  compiled, plan = s.compile_step()
  compile_time = time.time() - compile_start
  logging.info("Compiled the train step in %.1fs.", compile_time)
  logging.info("%s", plan.table())
  if plan.device_limit is None:
    logging.info("The %s backend reports no memory limit: the plan is not checked.",
                 plan.device_kind)
  memory_plan.check_fits(plan, settings.ConfigError)

  # ---------------------------------------------------------------- State: init or restore.
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    every=st.run.checkpoint_every,
                                    keep=st.run.keep_checkpoints)
  # The newest intact checkpoint: a damaged latest one is set aside (logged).
  restored = ckpt.restore_latest(checkpointing.abstract_like(s.state_shapes, s.shardings))
  resume_step = None if restored is None else restored[0]
  if restored is not None:
    _, state, meta = restored
    logging.info("Resumed from step %d (data position %d).", resume_step,
                 meta["data_position"])
  else:
    state = s.init_state()
  start_step = int(state.step)
  evaluator = Evaluator(st, s.model_cfg, s.tokenizer, s.eval_batches, s.host_verifier,
                        s.mesh, s.state_shapes.params)

  # ---------------------------------------------------------------- Loop.
  writer = metrics_lib.MetricWriter(workdir, resume_step=start_step, active=primary)
  summary_path = os.path.join(workdir, "summary.json")
  previous = {}
  if resume_step is not None and os.path.exists(summary_path + ".partial"):
    with open(summary_path + ".partial", encoding="utf-8") as f:
      previous = json.load(f)
  eval_before = previous.get("eval_before")
  # Evaluating is collective: every process follows process 0's record of it.
  if _from_primary(eval_before is None):
    eval_before = evaluator(state.params)
    writer.write(start_step, eval_before)
    if primary:
      _write_json(summary_path + ".partial", {"eval_before": eval_before})
  stop = _StopFlag(check_every=st.run.checkpoint_every)
  stop.install()
  progress = metrics_lib.Progress(st.run.total_steps, active=primary)
  late = _LateMetrics(st, s.schedule, s.host_verifier, writer, progress)
  interrupted = False
  try:
    step = start_step
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
        interrupted = True
        break
    late.flush()
  finally:
    stop.restore()
    progress.close()

  if interrupted:
    writer.close()
    ckpt.close()
    _log_verified(s.host_verifier)
    return {"interrupted_at_step": int(state.step)}

  eval_after = evaluator(state.params)
  writer.write(int(state.step), eval_after)
  writer.close()
  ckpt.save(int(state.step), state, {"data_position": int(state.step), "seed": st.run.seed})
  ckpt.close()
  _log_verified(s.host_verifier)
  summary = {
      "steps": int(state.step),
      "eval_success_before": eval_before["eval/success_rate"],
      "eval_success_after": eval_after["eval/success_rate"],
      "eval_before": eval_before,
      "eval_after": eval_after,
      "compile_time_s": compile_time,
      "step_time_median_s": (statistics.median(late.step_times) if late.step_times
                             else None),
      "wall_time_s": time.time() - wall_start,
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
  }
  if primary:
    _write_json(summary_path, summary)
    if os.path.exists(summary_path + ".partial"):
      os.remove(summary_path + ".partial")
  logging.info("Held-out success before %.3f, after %.3f.", summary["eval_success_before"],
               summary["eval_success_after"])
  return summary


def _log_verified(host_verifier):
  logging.info("Process %d verified %d rows in %d calls (feedback cut: %d rows).",
               jax.process_index(), host_verifier.rows, host_verifier.calls,
               host_verifier.feedback_cut_rows)


def _primary_first(load):
  """`load()` on every process; on many processes process 0 calls it first and the
  others wait, so that process 0 alone builds whatever is missing in the shared
  directory (base model, data caches) instead of every process building it at once."""
  if jax.process_count() > 1:
    result = load() if distributed.is_primary() else None
    multihost_utils.sync_global_devices("mopd_jax: process 0 has loaded")
    if distributed.is_primary():
      return result
  return load()


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
