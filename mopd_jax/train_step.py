"""One MOPD training step, as pure functions composed into a single jitted function.

    prompts [B, Lp] -> sample G each (student)         tokens [N=B*G, Lr], log-probs
      -> verify on the host (io_callback)               rewards [N]
      -> select peers per group                         primary/another/failure, mask
      -> assemble teacher prompts (gathers)             teacher tokens [N, Ltp]
      -> teacher forward (stop-gradient)                hidden [N, Lr, D] (per term)
      -> student forward + chunked top-k JSD + grad     loss, grads
      -> AdamW (warm-up, clipping), EMA teacher         new state, metrics

This module holds micro-batching, the update and the assembly of the step; the types
are in `step_types` (re-exported here), the teacher inputs and scoring in
`step_teacher`, and what differs per algorithm (teacher context, loss, its weights and
metrics) in the registered algorithm `cfg.method` (`mopd_jax.algorithms`).
`make_train_step` jits the whole chain; `make_split_step` runs the same pieces as
jit(sample) -> host verify -> jit(update), for debugging, evaluation and asynchronous
setups.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from mopd_jax import packing, settings, sharding, step_teacher, teacher
from mopd_jax.sampling import SampleOutput
from mopd_jax.step_types import Rollouts, StepConfig, TeacherInputs, TrainState
from mopd_jax.verifiers import callback

__all__ = ["Rollouts", "StepConfig", "TrainState", "apply_update", "loss_and_grads",
           "make_optimizer", "make_split_step", "make_train_step", "packed_loss_and_grads",
           "update"]


def make_optimizer(optim: settings.OptimSettings):
  """AdamW after global-norm clipping; linear warm-up then constant learning rate.

  Returns (optimizer, schedule).
  """
  lr, warmup_steps = optim.lr, optim.warmup_steps
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, lr, max(warmup_steps, 1)), optax.constant_schedule(lr)],
      [max(warmup_steps, 1)]) if warmup_steps > 0 else optax.constant_schedule(lr)
  return optax.chain(
      optax.clip_by_global_norm(optim.grad_clip),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay),
  ), schedule


def step_keys(state: TrainState):
  """(sample key, peer-selection key) for this step: fold_in(rng, step)."""
  key = jax.random.fold_in(state.rng, state.step)
  return jax.random.split(key)


def raise_if_missing(batch):
  missing = {"prompt_tokens", "prompt_mask", "insert_index", "example_id"} - set(batch)
  if missing:
    raise ValueError(f"Batch is missing fields {sorted(missing)}; got {sorted(batch)}.")


def _to_micro_batches(tree, num):
  """[N, ...] -> [num, N / num, ...] with micro-batch m = rows m, m + num, m + 2 num, ...

  Strided rather than contiguous: rows are sharded over (data, fsdp) in contiguous
  blocks, so every micro-batch keeps rows on every device.
  """
  return jax.tree.map(
      lambda x: x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1), tree)


def _from_micro_batches(tree):
  return jax.tree.map(
      lambda x: x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:]), tree)


def loss_and_grads(cfg: StepConfig, state: TrainState, inputs: TeacherInputs,
                   rollouts: Rollouts):
  """Stages 2 and 3, over row micro-batches when `optim.micro_batch_rows` is set:
  the algorithm's `teacher_signal` and its `loss`, weighted by its `loss_weights`.

  Each micro-batch runs the teacher forward and the student forward + backward; the
  gradients (float32) and the loss are summed in a `lax.scan`, so only one micro-batch's
  activations are live at a time. Weights of the whole batch make the sum equal to the
  one-batch loss and gradient. Returns (loss, grads, student_logp, teacher_logp).
  """
  method = cfg.method
  weights = method.loss_weights(cfg, inputs)
  row_inputs = (inputs.prompt_tokens, inputs.prompt_mask, inputs.teacher_tokens,
                inputs.teacher_mask, inputs.response_mask, inputs.rollout_mask,
                inputs.advantages)

  def one(params, row_inputs, rollouts, weights):
    p_tok, p_mask, t_tok, t_mask, r_mask, ro_mask, adv = row_inputs
    mb = inputs.replace(prompt_tokens=p_tok, prompt_mask=p_mask, teacher_tokens=t_tok,
                        teacher_mask=t_mask, response_mask=r_mask, rollout_mask=ro_mask,
                        advantages=adv)
    signal = method.teacher_signal(cfg, state.teacher_params, params, mb, rollouts)
    loss_fn = functools.partial(method.loss, cfg)
    (loss, (s_logp, t_logp)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, mb, rollouts, signal, weights)
    return loss, grads, s_logp, t_logp

  n = rollouts.tokens.shape[0]
  rows = cfg.optim.micro_batch_rows
  if not rows or rows >= n:
    return one(state.params, row_inputs, rollouts, weights)
  num = n // rows
  stacked = _to_micro_batches((row_inputs, rollouts, weights), num)

  def body(carry, xs):
    loss_sum, grad_sum = carry
    loss, grads, s_logp, t_logp = one(state.params, *xs)
    grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
    return (loss_sum + loss, grad_sum), (s_logp, t_logp)

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
  (loss, grads), logps = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), stacked)
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
  student_logp, teacher_logp = _from_micro_batches(logps)
  return loss, grads, student_logp, teacher_logp


def _micro_batch_count(cfg: StepConfig, num_rows: int) -> int:
  rows = cfg.optim.micro_batch_rows
  return num_rows // rows if 0 < rows < num_rows else 1


def packed_loss_and_grads(cfg: StepConfig, state: TrainState, inputs: TeacherInputs,
                          rollouts: Rollouts):
  """`loss_and_grads` on packed rows (`config.optim.packed_tokens`, `mopd_jax.packing`).

  The same row micro-batches, each packed on device into the budget's rows of the
  student, teacher and loss layouts (each batch shard its own rows); the algorithm's
  `packed_teacher_signal` and `packed_loss` run on them with every token's whole-batch
  weight, so loss and gradient equal the padded path's. Returns (loss, grads,
  student_logp [N, Lr], teacher_logp [N, Lr], the `packing.PackedStep`), the log-probs
  read back into row order (0 off the responses).
  """
  method = cfg.method
  weights = method.loss_weights(cfg, inputs)
  response_mask = inputs.response_mask
  sequences = {
      "student_tokens": jnp.concatenate([inputs.prompt_tokens, rollouts.tokens], axis=1),
      "student_mask": jnp.concatenate([inputs.prompt_mask, response_mask], axis=1),
      "teacher_tokens": jnp.concatenate([inputs.teacher_tokens, rollouts.tokens], axis=1),
      "teacher_mask": jnp.concatenate([inputs.teacher_mask, response_mask], axis=1),
      "responses": rollouts.tokens, "response_mask": response_mask, "weights": weights,
      "sampler_logp": rollouts.logprobs}
  num = _micro_batch_count(cfg, rollouts.tokens.shape[0])
  packed = packing.pack(
      _to_micro_batches(sequences, num), prompt_len=inputs.prompt_tokens.shape[1],
      teacher_prompt_len=inputs.teacher_tokens.shape[1],
      packed_tokens=cfg.optim.packed_tokens,
      packed_teacher_tokens=cfg.optim.packed_teacher_tokens,
      shards=sharding.context_batch_shards(), pad_id=cfg.pad_id)

  def one(params, rows):
    signal = method.packed_teacher_signal(cfg, state.teacher_params, params, rows)
    loss_fn = functools.partial(method.packed_loss, cfg)
    (loss, (s_logp, t_logp)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, rows, signal)
    return loss, grads, s_logp, t_logp

  if num == 1:
    loss, grads, s_logp, t_logp = one(state.params, jax.tree.map(lambda x: x[0],
                                                                 packed.rows))
    logps = (s_logp[None], t_logp[None])
  else:
    def body(carry, rows):
      loss_sum, grad_sum = carry
      loss, grads, s_logp, t_logp = one(state.params, rows)
      grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
      return (loss_sum + loss, grad_sum), (s_logp, t_logp)

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
    (loss, grads), logps = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                        packed.rows)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
  student_logp, teacher_logp = (_from_micro_batches(packing.unpack(x, packed))
                                for x in logps)
  return loss, grads, student_logp, teacher_logp, packed


def packing_metrics(cfg: StepConfig, inputs: TeacherInputs, rollouts: Rollouts,
                    packed: packing.PackedStep):
  """How full the packed rows were, whether the batch fit its budgets, and the smallest
  `optim.packed_tokens` and `optim.packed_teacher_tokens` it would have fit (without a
  teacher budget the teacher's rows count towards packed_tokens, whose rows it shares)."""
  lr = rollouts.tokens.shape[1]
  rows = packed.rows_needed
  if not cfg.optim.packed_teacher_tokens:
    rows = jnp.maximum(rows, packed.teacher_rows_needed)
  return {"train/packed_overflow_rows": packed.overflow_rows,
          "train/packed_tokens_needed": rows * (inputs.prompt_tokens.shape[1] + lr),
          "train/packed_teacher_tokens_needed":
              packed.teacher_rows_needed * (inputs.teacher_tokens.shape[1] + lr),
          **{f"train/packed_fill_{k}": v for k, v in packed.fill.items()}}


def apply_update(cfg: StepConfig, optimizer, state: TrainState, loss, grads, ok=True):
  """Stage 4: optimizer step, then the EMA teacher, both skipped on a non-finite loss or
  gradient norm, or where `ok` (bool scalar) is False (a batch that did not fit its
  packed budget). The teacher mixes in the student *after* this update (MOPD spec §4, as
  the authors do). Returns (new state, grad norm, finite)."""
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  apply = finite & ok
  updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(  # noqa: E731
      lambda a, o: jnp.where(apply, a, o), new, old)
  new_params = keep(new_params, state.params)
  new_state = state.replace(
      step=state.step + 1,
      params=new_params,
      opt_state=keep(new_opt_state, state.opt_state),
      teacher_params=teacher.ema_update(state.teacher_params, new_params, cfg.teacher.ema,
                                        apply),
  )
  return new_state, grad_norm, finite


def step_metrics(inputs: TeacherInputs, rollouts: Rollouts, loss, grad_norm,
                 finite, student_logp, teacher_logp):
  """Stage 5: scalar metrics of the step."""
  fmask = inputs.response_mask.astype(jnp.float32)
  ntok = jnp.maximum(fmask.sum(), 1.0)
  teacher_len = inputs.teacher_mask.sum(-1).astype(jnp.float32)
  status, success = rollouts.status, inputs.success
  return {
      "train/loss": loss,
      "train/grad_norm": grad_norm,
      "train/skipped_nonfinite": (~finite).astype(jnp.float32),
      "train/reward_mean": rollouts.rewards.mean(),
      "train/success_rate": success.mean(),
      "train/reprompt_fraction": inputs.rollout_mask.mean(),
      "train/group_mixed_fraction": (success.any(1) & ~success.all(1)).mean(),
      "train/response_len_mean": rollouts.lengths.mean(),
      "train/finished_fraction": rollouts.finished.mean(),
      "train/teacher_prompt_len_min": teacher_len.min(),
      "train/teacher_prompt_len_mean": teacher_len.mean(),
      "train/teacher_prompt_len_max": teacher_len.max(),
      "train/logprob_gap_abs": (jnp.abs(student_logp - rollouts.logprobs) * fmask).sum()
                               / ntok,
      "train/teacher_minus_student_logp": ((teacher_logp - student_logp) * fmask).sum()
                                          / ntok,
      "verify/format_errors": (status == callback.STATUS_CODES["format_error"]).sum(),
      "verify/timeouts": (status == callback.STATUS_CODES["timeout"]).sum(),
      "verify/errors": (status == callback.STATUS_CODES["error"]).sum(),
  }


def update(cfg: StepConfig, optimizer, pieces, state: TrainState, batch,
           rollouts: Rollouts, peer_key):
  """Everything after verification, in the order it runs: peers and teacher prompts ->
  teacher scoring -> loss and gradient -> optimizer and EMA update -> metrics."""
  inputs = step_teacher.build_teacher_inputs(cfg, pieces, batch, rollouts, peer_key)
  extra = {}
  if cfg.optim.packed_tokens:
    loss, grads, student_logp, teacher_logp, packed = packed_loss_and_grads(
        cfg, state, inputs, rollouts)
    new_state, grad_norm, finite = apply_update(cfg, optimizer, state, loss, grads,
                                                ok=packed.overflow_rows == 0)
    extra = packing_metrics(cfg, inputs, rollouts, packed)
  else:
    loss, grads, student_logp, teacher_logp = loss_and_grads(cfg, state, inputs, rollouts)
    new_state, grad_norm, finite = apply_update(cfg, optimizer, state, loss, grads)
  metrics = step_metrics(inputs, rollouts, loss, grad_norm, finite, student_logp,
                         teacher_logp)
  metrics.update(extra)
  if rollouts.summary_missing is not None:
    metrics["train/summary_missing_fraction"] = rollouts.summary_missing.mean(
        dtype=jnp.float32)
  return new_state, {**metrics, **cfg.method.metrics(cfg, inputs, rollouts)}


def _verify(cfg, mesh, host_fn, batch, out: SampleOutput) -> Rollouts:
  ids = jnp.repeat(batch["example_id"], cfg.num_samples, axis=0)
  rewards, status, feedback, feedback_lengths = callback.verify_on_device(
      mesh, host_fn, ids, out.tokens, out.lengths, feedback_len=max(cfg.peers.feedback_room, 1))
  summaries = {}
  if cfg.peers.summaries:
    summaries = dict(zip(("summaries", "summary_lengths", "summary_missing"),
                         callback.summarize_on_device(mesh, host_fn.summarize, out.tokens,
                                                      out.lengths,
                                                      summary_len=cfg.peers.summary_len)))
  return Rollouts(tokens=out.tokens, logprobs=out.logprobs, lengths=out.lengths,
                  finished=out.finished, rewards=rewards, status=status,
                  feedback=feedback, feedback_lengths=feedback_lengths, **summaries)


def state_shardings(state_shapes, param_shardings, mesh, optimizer,
                    teacher_shardings=None):
  """Shardings of a TrainState: params and teacher as the rules say, the rest replicated.

  teacher_shardings: for an external teacher with its own shapes; default: the student's.
  """
  rep = sharding.replicated(mesh)
  opt = optax.tree_map_params(optimizer, lambda _, s: s, state_shapes.opt_state,
                              param_shardings, transform_non_params=lambda _: rep)
  return TrainState(step=rep, params=param_shardings, opt_state=opt,
                    teacher_params=teacher_shardings or param_shardings, rng=rep)


def batch_shardings(mesh):
  return {"prompt_tokens": sharding.batch_sharding(mesh, 2),
          "prompt_mask": sharding.batch_sharding(mesh, 2),
          "insert_index": sharding.batch_sharding(mesh, 1),
          "example_id": sharding.batch_sharding(mesh, 1)}


def make_train_step(cfg: StepConfig, mesh, host_fn: Callable, optimizer, pieces,
                    shardings: TrainState):
  """Jitted (state, batch) -> (state, metrics); donates the state; traced once."""

  traces = []

  def step(state, batch):
    # Tracing happens once per input signature; a second trace means the step would
    # recompile (changed shapes, dtypes or shardings), which a run never wants.
    traces.append(1)
    if len(traces) > 1:
      raise RuntimeError(
          "The train step is being traced a second time: its input shapes, dtypes or "
          "shardings changed between calls, which would recompile it.")
    raise_if_missing(batch)
    batch = step_teacher.student_prompts(cfg.peers, pieces, batch, cfg.pad_id)
    sample_key, peer_key = step_keys(state)
    out = cfg.sampler(state.params, batch["prompt_tokens"], batch["prompt_mask"],
                      sample_key)
    rollouts = _verify(cfg, mesh, host_fn, batch, out)
    return update(cfg, optimizer, pieces, state, batch, rollouts, peer_key)

  # The template pieces are a few small constants: closed over, not arguments.
  return sharding.UnderMesh(
      jax.jit(step, in_shardings=(shardings, batch_shardings(mesh)),
              out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,)),
      mesh)


def make_split_step(cfg: StepConfig, mesh, host_fn: Callable, optimizer, pieces,
                    shardings: TrainState):
  """The same step as jit(sample) -> host verify -> jit(update); donates the state.

  On many processes each one verifies the rows its devices hold (as the fused step's
  callback does): the samples stay on the devices, only this process's rows come to the
  host, and the verifier's outputs go back as global arrays split over the batch axes.
  """

  def sample_fn(state, batch):
    batch = step_teacher.student_prompts(cfg.peers, pieces, batch, cfg.pad_id)
    sample_key, _ = step_keys(state)
    out = cfg.sampler(state.params, batch["prompt_tokens"], batch["prompt_mask"],
                      sample_key)
    # Rows split over the batch axes, as the host side reads them (`local_rows`).
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh, x.ndim)),
        out)

  sample_fn = sharding.UnderMesh(jax.jit(sample_fn), mesh)

  def update_fn(state, batch, rollouts):
    batch = step_teacher.student_prompts(cfg.peers, pieces, batch, cfg.pad_id)
    _, peer_key = step_keys(state)
    return update(cfg, optimizer, pieces, state, batch, rollouts, peer_key)

  update_jit = sharding.UnderMesh(
      jax.jit(update_fn, in_shardings=(shardings, batch_shardings(mesh), None),
              out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,)),
      mesh)

  def step(state, batch):
    out = sample_fn(state, batch)
    tokens, lengths = sharding.local_rows(out.tokens), sharding.local_rows(out.lengths)
    ids = sharding.local_rows(batch["example_id"]).repeat(cfg.num_samples)
    host = dict(zip(("rewards", "status", "feedback", "feedback_lengths"),
                    host_fn(ids, tokens, lengths)))
    if cfg.peers.summaries:
      host.update(zip(("summaries", "summary_lengths", "summary_missing"),
                      host_fn.summarize(tokens, lengths)))
    host = sharding.global_batch(mesh, host, out.tokens.shape[0])
    rollouts = Rollouts(tokens=out.tokens, logprobs=out.logprobs, lengths=out.lengths,
                        finished=out.finished, **host)
    return update_jit(state, batch, rollouts)

  # The two jitted halves, for compiling them ahead of time (e.g. for a TPU topology).
  step.sample, step.update = sample_fn, update_jit
  return step
