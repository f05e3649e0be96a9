"""Everything a run builds before its first step: mesh, models, data, verifier, shardings.

`setup` validates the config and returns a `Setup`, from which the loop (`mopd_jax.train`),
the tests and the benchmarks take the state, the batches and the compiled step. The mesh and
the state's layout are built by functions that the compile-only run (`mopd_jax.aot`) shares,
so that it refuses what a real run would refuse and compiles the same layout.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp

from mopd_jax import (checkpointing, demo_base, distributed, hf_tokenizer, memory_plan,
                      peer_template, settings, sharding, teacher, train_step)
from mopd_jax.data import pipeline
from mopd_jax.models import attention as attention_lib, presets, transformer
from mopd_jax.verifiers import callback, choice, code, math as math_verifier, tooluse


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
  pieces: peer_template.TemplatePieces

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
    """The compiled fused step and its memory plan, from abstract shapes only.

    With `sampling.decode_layout = "auto"` the step is compiled with the 'tensor' decode
    layout; when that plan does not fit the device (or the compiler refuses it for
    memory) and the mesh has fsdp devices, it is compiled again with 'wide'. The layout
    kept (the one that fits, else the smaller) is written into `settings` and `step_cfg`,
    so that the evaluation sampler and every later step use it; the plan names it.
    """
    layout = self.settings.sampling.decode_layout
    if layout != "auto" or self.mesh.shape["fsdp"] == 1:  # no fsdp: 'wide' splits no more
      return self._compile_with("tensor" if layout == "auto" else layout)
    try:
      tensor = self._compile_with("tensor")
    except jax.errors.JaxRuntimeError as e:
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      logging.info("The compiler refused the step with the 'tensor' decode layout for "
                   "memory (%s); compiling it with 'wide'.", str(e).splitlines()[0])
      return self._compile_with("wide")
    if tensor[1].fits():
      return tensor
    logging.info("The step does not fit with the 'tensor' decode layout (%.2f GiB per "
                 "device); compiling it with 'wide'.", tensor[1].total / 2**30)
    try:
      wide = self._compile_with("wide")
    except ValueError as e:  # e.g. query heads that tensor x fsdp does not divide
      logging.warning("The 'wide' decode layout does not apply here: %s", e)
      wide = None
    kept = (wide if wide and (wide[1].fits() or wide[1].total < tensor[1].total)
            else tensor)
    self._set_decode_layout(kept[1].decode_layout)
    return kept

  def _set_decode_layout(self, layout: str):
    sampling = dataclasses.replace(self.settings.sampling, decode_layout=layout)
    self.settings = dataclasses.replace(self.settings, sampling=sampling)
    self.step_cfg = dataclasses.replace(self.step_cfg, sampling=sampling)

  def _compile_with(self, layout: str):
    """(compiled step, memory plan) with the sampler in `layout`, which becomes this
    setup's decode layout."""
    self._set_decode_layout(layout)
    compiled = self.train_step().lower(*self.abstract_inputs()).compile()
    st = self.settings
    # With summaries, the student's prompts carry the summary instruction too.
    extra = len(self.pieces.summary_pieces()[0]) if st.peers.summaries else 0
    kv = memory_plan.kv_cache_bytes(
        self.model_cfg, prompts=st.data.batch_size, rows=st.rows,
        prompt_len=st.data.max_prompt_len + extra,
        response_len=st.sampling.max_response_len,
        **memory_plan.kv_cache_split(self.model_cfg, self.mesh, layout))
    plan = memory_plan.make_plan(
        compiled, self.state_shapes, self.shardings, kv, self.mesh.devices.flat[0],
        decode_weights=memory_plan.decode_weight_bytes(
            self.model_cfg, self.state_shapes.params, self.mesh, layout),
        decode_layout=layout)
    return compiled, plan


def setup(config, *, score_batch=None, devices=None) -> Setup:
  """Validates `config` and builds mesh, model, data, verifier and state shardings.

  config: a run ConfigDict (validated into `settings.Settings` here) or the Settings.

  score_batch: (texts, references) -> list[Result]; defaults to the verifier of the
  data's domain (the code verifier for the demo).
  """
  st = config if isinstance(config, settings.Settings) else settings.from_config(config)

  # ---------------------------------------------------------------- Mesh.
  mesh = make_mesh(st, devices)
  logging.info("Mesh %s over %d %s devices.", dict(mesh.shape), mesh.size,
               mesh.devices.flat[0].platform)
  try:
    attention_lib.check_backend(st.model.attention, mesh.devices.flat[0].platform)
  except ValueError as e:
    raise settings.ConfigError(str(e)) from e

  # ---------------------------------------------------------------- Models and tokenizer.
  base_cfg, base_params, tok, cache_dir, _ = _load_model(st, mesh)
  model_cfg = st.model.model_config(base_cfg, axis_rules=sharding.DEFAULT_RULES)
  teacher_cfg, teacher_params = _load_external_teacher(st, mesh, model_cfg)

  # ---------------------------------------------------------------- Data.
  train_batches, eval_batches, host_verifier = _load_data(st, tok, cache_dir, score_batch)

  # ---------------------------------------------------------------- Shardings.
  optimizer, schedule = train_step.make_optimizer(st.optim)
  param_dtype = transformer.dtype_from_name(model_cfg.param_dtype)
  param_shapes = jax.eval_shape(
      lambda: jax.tree.map(lambda x: jnp.asarray(x, param_dtype), base_params))
  teacher_shapes = (None if teacher_params is None
                    else jax.eval_shape(lambda: teacher_params))
  state_shapes, shardings, param_shardings, teacher_shardings = state_layout(
      model_cfg, param_shapes, optimizer, mesh, teacher_cfg, teacher_shapes)
  step_cfg = train_step.StepConfig.from_settings(st, model_cfg, tok, teacher_cfg)
  return Setup(settings=st, mesh=mesh, tokenizer=tok, model_cfg=model_cfg, step_cfg=step_cfg,
               optimizer=optimizer, schedule=schedule,
               base_params=jax.device_put(base_params, param_shardings),
               external_teacher_params=(None if teacher_params is None else
                                        jax.device_put(teacher_params, teacher_shardings)),
               state_shapes=state_shapes, shardings=shardings,
               train_batches=train_batches, eval_batches=eval_batches,
               host_verifier=host_verifier, pieces=peer_template.tokenize_pieces(tok))


def make_mesh(st: settings.Settings, devices=None, *, devices_of: str | None = None,
              evaluation: bool = True):
  """The run's mesh over `devices` (None: all), with its row splits checked on it.

  devices_of: what the devices are, for messages (None: this run's processes; a
    compile-only run names its topology).
  evaluation: whether the held-out prompts are split over this mesh too (a compile-only
    run compiles no evaluation sampler).
  """
  where = "" if devices_of is None else f" on {devices_of}"
  devices_of = devices_of or f"{jax.process_count()} process(es)"
  try:
    mesh = sharding.make_mesh(st.mesh.shape, devices, dcn_shape=st.mesh.dcn_shape)
  except ValueError as e:
    raise settings.ConfigError(
        f"config.mesh.shape = {st.mesh.shape} with config.mesh.dcn_shape = "
        f"{st.mesh.dcn_shape} does not fit the {len(devices or jax.devices())} devices "
        f"of {devices_of}: {e}") from e
  check_batch_split(st, mesh, evaluation=evaluation, where=where)
  return mesh


def check_batch_split(st: settings.Settings, mesh, *, evaluation: bool = True,
                      where: str = ""):
  """Every batch split by rows over data x fsdp must split evenly on `mesh`.

  The training prompts, the held-out prompts (when `evaluation`) and the update's
  micro-batches, each of which must keep rows on every device. The one check of a real
  run (`setup`) and of a compile-only run (`mopd_jax.aot`), so that a compile-only
  verdict never passes a layout that a real run refuses. where: follows the mesh in the
  messages (e.g. " on v5e:2x2").
  """
  divisor = sharding.batch_divisor(mesh)
  splits = [("data.batch_size", st.data.batch_size, "")]
  if evaluation:
    splits.append(("eval.num_prompts", st.eval.num_prompts, ""))
  mb = st.optim.micro_batch_rows
  if mb and mb < st.rows:
    splits.append(("optim.micro_batch_rows", mb,
                   ", so that every micro-batch keeps rows on every device"))
  for key, rows, why in splits:
    if rows % divisor:
      raise settings.ConfigError(
          f"config.{key}={rows} must be divisible by the data x fsdp mesh size "
          f"{divisor} (mesh {dict(mesh.shape)}{where}){why}; change config.{key} or "
          "config.mesh.shape (e.g. more 'tensor').")


def state_layout(model_cfg, param_shapes, optimizer, mesh, teacher_cfg=None,
                 teacher_shapes=None):
  """(state shapes, state shardings, param shardings, teacher shardings) of a TrainState.

  From abstract shapes only, shared with the compile-only run. teacher_shapes: the
  external teacher's parameters (None: a self-teacher shaped like the student, whose
  shardings are the student's).
  """
  param_shardings = sharding.logical_to_shardings(
      transformer.param_logical_axes(model_cfg), param_shapes, mesh)
  teacher_shardings = None
  if teacher_shapes is not None:
    teacher_shardings = sharding.logical_to_shardings(
        transformer.param_logical_axes(teacher_cfg), teacher_shapes, mesh)
  state_shapes = jax.eval_shape(lambda p, t: train_step.TrainState(
      step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
      teacher_params=teacher.init_teacher(p) if t is None else t,
      rng=jax.random.PRNGKey(0)), param_shapes, teacher_shapes)
  shardings = train_step.state_shardings(state_shapes, param_shardings, mesh, optimizer,
                                         teacher_shardings)
  return state_shapes, shardings, param_shardings, teacher_shardings


def _load_data(st: settings.Settings, tok, cache_dir: str, score_batch):
  """(train batches, held-out batches, host verifier) of the configured data."""
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
                                        share_texts=st.peers.summaries,
                                        dedupe=st.verifier.dedupe)
  return train_batches, eval_batches, host_verifier


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
  tok = hf_tokenizer.HFTokenizer(path)
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
  if st.teacher.checkpoint == "demo":  # the demo base model's larger teacher
    base_dir = st.model.cache_dir or demo_base.default_dir()
    teacher_cfg, params, _ = _primary_first(lambda: demo_base.ensure_teacher(base_dir))
    teacher_cfg = dataclasses.replace(teacher_cfg, param_dtype=st.teacher.param_dtype)
    dtype = transformer.dtype_from_name(st.teacher.param_dtype)
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
  else:
    from mopd_jax.models import hf_import  # pylint: disable=import-outside-toplevel
    teacher_cfg, params = hf_import.load(st.teacher.checkpoint,
                                         dtype=st.teacher.param_dtype, mesh=mesh)
  if teacher_cfg.vocab_size != student_cfg.vocab_size:
    raise settings.ConfigError(
        f"The external teacher's vocabulary ({teacher_cfg.vocab_size} tokens, "
        f"{st.teacher.checkpoint}) differs from the student's "
        f"({student_cfg.vocab_size} tokens): teacher and student must share a vocabulary.")
  return st.model.model_config(teacher_cfg, axis_rules=student_cfg.axis_rules,
                               external_teacher=True), params


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
