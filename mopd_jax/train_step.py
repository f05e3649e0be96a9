"""One MOPD training step, as pure functions composed into a single jitted function.

    prompts [B, Lp] -> sample G each (student)         tokens [N=B*G, Lr], log-probs
      -> verify on the host (io_callback)               rewards [N]
      -> select peers per group                         primary/another/failure, mask
      -> assemble teacher prompts (gathers)             teacher tokens [N, Ltp]
      -> teacher forward (stop-gradient)                hidden [N, Lr, D] (per term)
      -> student forward + chunked top-k JSD + grad     loss, grads
      -> AdamW (warm-up, clipping), EMA teacher         new state, metrics

`make_train_step` jits the whole chain; `make_split_step` runs the same pieces as
jit(sample) -> host verify -> jit(update), for debugging and evaluation.

Alignment of response positions: the student input is prompt [Lp] + response [Lr] and
the teacher input is teacher prompt [Ltp] + the same response; both prompts are
left-padded, so the hidden state that predicts response token t sits at index
Lp - 1 + t (student) and Ltp - 1 + t (teacher) in every row.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from mopd_jax import losses, peer_context, peer_controls, settings, sharding, teacher
from mopd_jax.models import transformer
from mopd_jax.sampling import Sampler, SampleOutput
from mopd_jax.verifiers import callback


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  params: Any
  opt_state: Any
  teacher_params: Any  # float32
  rng: jax.Array  # uint32 [2], raw PRNG key (checkpointable)


@flax.struct.dataclass
class Rollouts:
  """Sampled responses and their verification, row b*G + g = sample g of prompt b."""

  tokens: jax.Array  # int32 [N, Lr]
  logprobs: jax.Array  # float32 [N, Lr], sampler log-probs
  lengths: jax.Array  # int32 [N], incl. end-of-sequence token
  finished: jax.Array  # bool [N]
  rewards: jax.Array  # float32 [N]
  status: jax.Array  # int32 [N], see verifiers.callback.STATUS_CODES
  feedback: jax.Array  # int32 [N, Lf]
  feedback_lengths: jax.Array  # int32 [N]
  # Summaries variant only (else None): `HostVerifier.summarize` of every response.
  summaries: jax.Array | None = None  # int32 [N, summary_len], right-padded
  summary_lengths: jax.Array | None = None  # int32 [N]
  summary_missing: jax.Array | None = None  # int32 [N], 1 = no <summary> tag


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of the step (hashable): the sections of `mopd_jax.settings` it
  uses, the model's shapes and the tokenizer's special ids."""

  model: transformer.ModelConfig
  sampling: settings.SamplingSettings
  peers: settings.PeerSettings
  loss: settings.LossSettings
  teacher: settings.TeacherSettings
  optim: settings.OptimSettings
  stop_ids: tuple[int, ...]
  pad_id: int
  success_threshold: float = 1.0
  # External teacher (classic OPD): its own shapes, same vocabulary. None = self-teacher.
  teacher_model: transformer.ModelConfig | None = None
  algorithm: settings.AlgorithmSettings = settings.AlgorithmSettings()

  @classmethod
  def from_settings(cls, s: settings.Settings, model, tokenizer, teacher_model=None):
    return cls(model=model, sampling=s.sampling,
               peers=s.algorithm.peer_settings(s.peers), loss=s.loss,
               teacher=s.teacher, optim=s.optim, stop_ids=tuple(tokenizer.stop_ids),
               pad_id=tokenizer.pad_id, success_threshold=s.verifier.success_threshold,
               teacher_model=teacher_model, algorithm=s.algorithm)

  @property
  def num_samples(self) -> int:
    return self.sampling.num_samples

  @property
  def sampler(self) -> Sampler:
    sp = self.sampling
    return Sampler(model=self.model, max_new_tokens=sp.max_response_len,
                   stop_ids=self.stop_ids, pad_id=self.pad_id,
                   temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p,
                   num_samples=sp.num_samples)

  @property
  def teacher_cfg(self) -> transformer.ModelConfig:
    return self.teacher_model or self.model


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


def student_prompts(peers: settings.PeerSettings, pieces, batch, pad_id: int):
  """The batch as the student sees it: with peers.summaries, every prompt gets the
  summary instruction at its insertion index (prompts grow by its static length and the
  insertion index moves past it, so the teacher's context follows the instruction);
  otherwise the batch unchanged."""
  if not peers.summaries:
    return batch
  instruction = pieces.summary_pieces()[0]
  tokens, mask, insert_index = peer_context.insert_piece(
      batch["prompt_tokens"], batch["prompt_mask"].astype(bool), batch["insert_index"],
      instruction, pad_id)
  return {**batch, "prompt_tokens": tokens, "prompt_mask": mask, "insert_index": insert_index}


def _response_hidden(model_cfg, params, prompt_tokens, prompt_mask, responses,
                     response_mask):
  """Hidden states [N, Lr, D] that predict each response token."""
  tokens = jnp.concatenate([prompt_tokens, responses], axis=1)
  mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
  # The [B, L] token mask (causal attention over real tokens), never a dense [B, L, L]
  # mask: the attention kind builds its mask per block.
  hidden, _ = transformer.hidden_states(model_cfg, params, tokens,
                                        transformer.positions_from_mask(mask), mask)
  lp, lr = prompt_tokens.shape[1], responses.shape[1]
  return hidden[:, lp - 1:lp - 1 + lr]


@flax.struct.dataclass
class TeacherInputs:
  """Stage 1's output: peers, teacher prompts and the masks the loss uses."""

  prompt_tokens: jax.Array  # int32 [N, Lp], student prompts, left-padded
  prompt_mask: jax.Array  # bool [N, Lp]
  teacher_tokens: jax.Array  # int32 [N, Ltp], teacher prompts, left-padded
  teacher_mask: jax.Array  # bool [N, Ltp]
  response_mask: jax.Array  # bool [N, Lr], True on response tokens (EOS included)
  rollout_mask: jax.Array  # bool [N], the rollout enters the loss (e.g. has a context block)
  advantages: jax.Array  # float32 [N], GRPO's group-relative advantages (else 0)
  success: jax.Array  # bool [B, G]

  @property
  def loss_mask(self):
    return self.response_mask & self.rollout_mask[:, None]


def build_teacher_inputs(cfg: StepConfig, pieces, batch, rollouts: Rollouts,
                         peer_key) -> TeacherInputs:
  """Stage 1: select peers per group and assemble every rollout's teacher prompt.

  Algorithms without a peer context (opd and the policy losses) give the teacher the
  plain prompt, and their own rollout mask (see `_plain_prompt_rollout_mask`).
  """
  g, pc = cfg.num_samples, cfg.peers
  b = batch["prompt_tokens"].shape[0]
  n, lr = rollouts.tokens.shape
  rep = lambda x: jnp.repeat(x, g, axis=0)  # noqa: E731
  prompt_tokens, prompt_mask = rep(batch["prompt_tokens"]), rep(batch["prompt_mask"])
  prompt_mask = prompt_mask.astype(bool)

  success = (rollouts.rewards >= cfg.success_threshold).reshape(b, g)
  response_mask = jnp.arange(lr)[None, :] < rollouts.lengths[:, None]
  advantages = jnp.zeros((n,), jnp.float32)
  if cfg.algorithm.name == "grpo":
    advantages = losses.grpo_advantages(
        rollouts.rewards.reshape(b, g),
        normalize_std=cfg.algorithm.grpo_normalize_std).reshape(n)
  if cfg.algorithm.name not in ("mopd", "sdpo"):
    return TeacherInputs(prompt_tokens=prompt_tokens, prompt_mask=prompt_mask,
                         teacher_tokens=prompt_tokens, teacher_mask=prompt_mask,
                         response_mask=response_mask,
                         rollout_mask=_plain_prompt_rollout_mask(cfg, rollouts, b),
                         advantages=advantages, success=success)
  text_lengths = rollouts.lengths - rollouts.finished.astype(jnp.int32)  # drop EOS
  control_kwargs = {}
  if pc.control:
    control = peer_controls.matched_control(
        success, text_lengths.reshape(b, g), peer_key, control=pc.control,
        peer_cap=pc.peer_cap, budget=pc.control_budget,
        exclude_self_success=pc.exclude_self_success)
    rows = jax.tree.map(lambda x: x.reshape(n), control.rows)
    control_kwargs = dict(block_lengths=control.block_lengths.reshape(n, 3))
    if pc.control == "success_only_matched":  # its failure slot shows a success
      pieces = pieces._replace(failure_header=pieces.another_header)
  else:
    selection = peer_context.select_peers(
        success, peer_key, include_primary=pc.include_primary,
        include_another=pc.include_another, include_failure=pc.include_failure,
        failure_condition=pc.failure_condition,
        exclude_self_success=pc.exclude_self_success)
    rows = jax.tree.map(lambda x: x.reshape(n), peer_context.to_row_indices(selection))
  rollout_mask = rows.mask
  summary_kwargs = {}
  if pc.summaries:
    if rollouts.summaries is None:
      raise ValueError("config.peers.summaries = True but the rollouts carry no summaries "
                       "(HostVerifier.summarize was not run on them).")
    k = min(pc.num_summaries, g - 1)
    # Self and the shown primary are excluded; flat rows -> within-group indices.
    primary = jnp.where(rows.primary >= 0, rows.primary % g, -1).reshape(b, g)
    members, successful = peer_context.select_summary_members(success, primary, k)
    offset = (jnp.arange(b, dtype=jnp.int32) * g)[:, None, None]
    summary_rows = jnp.where(members >= 0, members + offset, -1).reshape(n, k)
    rollout_mask |= (summary_rows >= 0).any(axis=1)
    summary_kwargs = dict(summary_tokens=rollouts.summaries,
                          summary_lengths=rollouts.summary_lengths, summary_rows=summary_rows,
                          summary_successful=successful.reshape(n, k),
                          summary_cap=pc.summary_len)
  feedback_kwargs = {}
  if pc.include_feedback:
    # The rollout's own verifier feedback, only without a (shown) primary solution
    # when feedback_only_without_solution; it counts as a block for the loss mask.
    use = rollouts.feedback_lengths > 0
    if pc.feedback_only_without_solution:
      use &= rows.primary < 0
    rollout_mask |= use
    feedback_kwargs = dict(feedback_tokens=rollouts.feedback,
                           feedback_lengths=jnp.where(use, rollouts.feedback_lengths, 0),
                           feedback_cap=pc.feedback_len)
  teacher_tokens, teacher_mask = peer_context.assemble_teacher_prompts(
      prompt_tokens, prompt_mask, rep(batch["insert_index"]), rollouts.tokens,
      text_lengths, rows, pieces, peer_cap=pc.peer_cap, pad_id=cfg.pad_id,
      **feedback_kwargs, **control_kwargs, **summary_kwargs)
  return TeacherInputs(prompt_tokens=prompt_tokens, prompt_mask=prompt_mask,
                       teacher_tokens=teacher_tokens, teacher_mask=teacher_mask,
                       response_mask=response_mask, rollout_mask=rollout_mask,
                       advantages=advantages, success=success)


def _plain_prompt_rollout_mask(cfg: StepConfig, rollouts: Rollouts, b: int):
  """bool [N]: which rollouts enter the loss when there is no peer context.

  opd, grpo: all (a group with equal rewards has zero advantages); sft: the verified
  rollouts (reward >= threshold, at least one token); dpo, simpo: rollouts of groups
  with at least one pair of different rewards.
  """
  n = rollouts.rewards.shape[0]
  if cfg.algorithm.name == "sft":
    return (rollouts.rewards >= cfg.success_threshold) & (rollouts.lengths > 0)
  if cfg.algorithm.name in ("dpo", "simpo"):
    rewards = rollouts.rewards.reshape(b, -1)
    has_pair = rewards.max(axis=1) > rewards.min(axis=1)  # [B]
    return jnp.repeat(has_pair, n // b)
  return jnp.ones((n,), bool)


class TeacherTerms(NamedTuple):
  """The teacher as terms whose weighted logits sum to its logits (stop-gradient):
  logits = sum_i weights[i] * hidden[i] @ head[i]. One term, except for the trust region."""

  hidden: tuple[jax.Array, ...]  # each [N, Lr, D_i] on the response positions
  head: tuple[jax.Array, ...]  # each [D_i, V]
  weights: tuple[float, ...]  # static


def score_with_teacher(cfg: StepConfig, teacher_params, inputs: TeacherInputs,
                       rollouts: Rollouts, model_cfg: transformer.ModelConfig | None = None):
  """Stage 2: the teacher's hidden states [N, Lr, D] on the response positions, and its
  LM head, under stop-gradient. model_cfg: the model of `teacher_params` (default: the
  teacher's)."""
  model_cfg = model_cfg or cfg.teacher_cfg
  teacher_params = jax.lax.stop_gradient(teacher_params)
  hidden = _response_hidden(model_cfg, teacher_params, inputs.teacher_tokens,
                            inputs.teacher_mask, rollouts.tokens, inputs.response_mask)
  return hidden, transformer.lm_head(model_cfg, teacher_params)


def teacher_terms(cfg: StepConfig, teacher_params, student_params, inputs: TeacherInputs,
                  rollouts: Rollouts) -> TeacherTerms:
  """Stage 2 as `TeacherTerms`: the teacher slot's model, or for teacher.mode
  'trust_region' the reference (the teacher slot) with weight 1 - rate and the current
  student (`student_params`) with weight rate, both reading the teacher prompt under
  stop-gradient: the student's extra forward has no backward.
  """
  terms = (("reference", 1.0),)
  if cfg.teacher.trust_region is not None:
    terms = teacher.trust_region_terms(cfg.teacher.trust_region)
  sources = {"reference": (teacher_params, cfg.teacher_cfg),
             "student": (student_params, cfg.model)}
  scored = []
  for source, _ in terms:
    params, model_cfg = sources[source]
    scored.append(score_with_teacher(cfg, params, inputs, rollouts, model_cfg=model_cfg))
  return TeacherTerms(hidden=tuple(h for h, _ in scored), head=tuple(w for _, w in scored),
                      weights=tuple(weight for _, weight in terms))


def distillation_loss(cfg: StepConfig, params, inputs: TeacherInputs, rollouts: Rollouts,
                      terms: TeacherTerms, weights):
  """Stage 3: the student's forward and the weighted top-k divergence.

  weights: float32 [N, Lr] from `losses.aggregation_weights` of the whole batch, so
  that the sum of this function over row micro-batches is the batch's loss.
  Returns (loss, (student log-prob of each response token, teacher's)), both [N, Lr].
  """
  lc = cfg.loss
  student_hidden = _response_hidden(cfg.model, params, inputs.prompt_tokens,
                                    inputs.prompt_mask, rollouts.tokens,
                                    inputs.response_mask)
  # The sampler's log-probs are at the sampling temperature (1 for greedy decoding).
  correction = (dict(sampler_logp=rollouts.logprobs,
                     correction_clip=lc.rollout_correction_clip,
                     sampler_temperature=cfg.sampling.temperature or 1.0)
                if lc.rollout_correction_clip > 0 else {})
  # Positions of weight 0 (masked, maybe garbage) do not enter the loss or its gradient.
  loss, _, student_logp, teacher_logp = losses.chunked_distillation(
      student_hidden, terms.hidden, transformer.lm_head(cfg.model, params),
      terms.head, rollouts.tokens, token_weights=weights,
      teacher_weights=terms.weights, alpha=lc.alpha, top_k=lc.top_k,
      add_tail=lc.add_tail, temperature=lc.temperature, chunk_size=lc.chunk_size,
      full_logit=lc.full_logit, **correction)
  return loss, (student_logp, teacher_logp)


def _policy_logp(cfg: StepConfig, model_cfg, params, prompt_tokens, prompt_mask,
                 inputs: TeacherInputs, rollouts: Rollouts):
  """float32 [N, Lr] log-probs of the response tokens at the sampling temperature."""
  hidden = _response_hidden(model_cfg, params, prompt_tokens, prompt_mask, rollouts.tokens,
                            inputs.response_mask)
  return losses.chunked_token_logp(hidden, transformer.lm_head(model_cfg, params),
                                   rollouts.tokens, temperature=cfg.sampling.temperature,
                                   chunk_size=cfg.loss.chunk_size)


def reference_logp(cfg: StepConfig, teacher_params, inputs: TeacherInputs,
                   rollouts: Rollouts):
  """Stage 2 of dpo: the reference model's response log-probs [N, Lr] on the plain
  prompt (the frozen initial student, kept in the teacher slot); None otherwise."""
  if cfg.algorithm.name != "dpo":
    return None
  return jax.lax.stop_gradient(_policy_logp(
      cfg, cfg.teacher_cfg, jax.lax.stop_gradient(teacher_params), inputs.teacher_tokens,
      inputs.teacher_mask, inputs, rollouts))


def policy_loss(cfg: StepConfig, params, inputs: TeacherInputs, rollouts: Rollouts,
                ref_logp, weights):
  """Stage 3 of grpo, sft, dpo and simpo: the student's forward and its policy loss.

  grpo and sft are per token and weighted like the distillation loss (`loss_weights`),
  so they split over row micro-batches; dpo and simpo average over the valid pairs of
  the whole batch. The rollout correction of the loss section applies to distillation
  only. Returns (loss, (student log-prob of each response token, reference
  log-prob for dpo, else the student's again)), both [N, Lr].
  """
  al = cfg.algorithm
  logp = _policy_logp(cfg, cfg.model, params, inputs.prompt_tokens, inputs.prompt_mask,
                      inputs, rollouts)  # [N, Lr]
  if al.name in ("grpo", "sft"):
    if al.name == "grpo":
      # One update per batch: the sampling policy is the current one, so the ratio is 1
      # in value and the gradient is the clipped surrogate's at 1.
      per_token = losses.grpo_per_token(
          logp, jax.lax.stop_gradient(logp), inputs.advantages, clip_low=al.grpo_clip_low,
          clip_high=al.grpo_clip_high, dual_clip=al.grpo_dual_clip)
    else:
      per_token, _ = losses.verified_sft_per_token(logp, inputs.response_mask,
                                                   rollouts.rewards,
                                                   threshold=cfg.success_threshold)
    loss = jnp.sum(jnp.where(weights != 0.0, per_token * weights, 0.0))
  else:
    fmask = inputs.response_mask.astype(jnp.float32)
    seq_logp = jnp.sum(jnp.where(inputs.response_mask, logp, 0.0), axis=1)  # [N]
    pairs = losses.group_pairs(rollouts.rewards.reshape(-1, cfg.num_samples))
    chosen, rejected = pairs.chosen.reshape(-1), pairs.rejected.reshape(-1)  # [B*P]
    if al.name == "dpo":
      ref_seq = jnp.sum(jnp.where(inputs.response_mask, ref_logp, 0.0), axis=1)
      per_pair = losses.dpo_loss(seq_logp[chosen], seq_logp[rejected], ref_seq[chosen],
                                 ref_seq[rejected], beta=al.dpo_beta)
    else:
      length = fmask.sum(axis=1)
      per_pair = losses.simpo_loss(seq_logp[chosen], seq_logp[rejected], length[chosen],
                                   length[rejected], beta=al.simpo_beta,
                                   gamma=al.simpo_gamma,
                                   label_smoothing=al.simpo_label_smoothing)
    valid = pairs.valid.reshape(-1)
    loss = jnp.sum(jnp.where(valid, per_pair, 0.0)) / jnp.maximum(valid.sum(), 1)
  logp = jax.lax.stop_gradient(logp)
  return loss, (logp, logp if ref_logp is None else ref_logp)


def loss_weights(cfg: StepConfig, inputs: TeacherInputs):
  """float32 [N, Lr] weights of the whole batch: the loss is sum(per_token * weights).

  sft: 1 / (number of verified rollouts) on their tokens (its per-token loss is already
  length-normalised); the others: `losses.aggregation_weights` of the loss mask.
  """
  if cfg.algorithm.name == "sft":
    count = jnp.maximum(inputs.rollout_mask.sum(), 1).astype(jnp.float32)
    return inputs.loss_mask.astype(jnp.float32) / count
  return losses.aggregation_weights(inputs.loss_mask, cfg.loss.aggregation)


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
  """Stages 2 and 3, over row micro-batches when `optim.micro_batch_rows` is set.

  Stage 3 is `distillation_loss` for mopd, sdpo and opd, else `policy_loss`.

  Each micro-batch runs the teacher forward and the student forward + backward; the
  gradients (float32) and the loss are summed in a `lax.scan`, so only one micro-batch's
  activations are live at a time. Weights of the whole batch make the sum equal to the
  one-batch loss and gradient. Returns (loss, grads, student_logp, teacher_logp).
  """
  weights = loss_weights(cfg, inputs)
  row_inputs = (inputs.prompt_tokens, inputs.prompt_mask, inputs.teacher_tokens,
                inputs.teacher_mask, inputs.response_mask, inputs.rollout_mask,
                inputs.advantages)

  def one(params, row_inputs, rollouts, weights):
    p_tok, p_mask, t_tok, t_mask, r_mask, ro_mask, adv = row_inputs
    mb = inputs.replace(prompt_tokens=p_tok, prompt_mask=p_mask, teacher_tokens=t_tok,
                        teacher_mask=t_mask, response_mask=r_mask, rollout_mask=ro_mask,
                        advantages=adv)
    if cfg.algorithm.distills:
      terms = teacher_terms(cfg, state.teacher_params, params, mb, rollouts)
      loss_fn = functools.partial(distillation_loss, cfg)
      args = (terms, weights)
    else:
      loss_fn = functools.partial(policy_loss, cfg)
      args = (reference_logp(cfg, state.teacher_params, mb, rollouts), weights)
    (loss, (s_logp, t_logp)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, mb, rollouts, *args)
    return loss, grads, s_logp, t_logp

  n = rollouts.tokens.shape[0]
  rows = cfg.optim.micro_batch_rows
  if not rows or rows >= n:
    return one(state.params, row_inputs, rollouts, weights)
  if n % rows:
    raise ValueError(f"optim.micro_batch_rows={rows} does not divide the {n} rows.")
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


def apply_update(cfg: StepConfig, optimizer, state: TrainState, loss, grads):
  """Stage 4: optimizer step and EMA teacher, both skipped on a non-finite loss or
  gradient norm. Returns (new state, grad norm, finite)."""
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(  # noqa: E731
      lambda a, o: jnp.where(finite, a, o), new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=keep(new_opt_state, state.opt_state),
      # EMA mixes in the student *before* this update (the teacher lags by one step).
      teacher_params=teacher.ema_update(state.teacher_params, state.params,
                                        cfg.teacher.ema, finite),
  )
  return new_state, grad_norm, finite


def step_metrics(inputs: TeacherInputs, rollouts: Rollouts, loss, grad_norm, finite,
                 student_logp, teacher_logp):
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


def algorithm_metrics(cfg: StepConfig, inputs: TeacherInputs, rollouts: Rollouts):
  """Stage 5, per algorithm: what the loss could use, so that nothing is dropped silently.

  grpo: groups whose rewards are all equal (zero advantage). sft: verified rollouts and
  groups without one. dpo, simpo: valid pairs and groups without a pair.
  """
  name = cfg.algorithm.name
  rewards = rollouts.rewards.reshape(-1, cfg.num_samples)  # [B, G]
  if name == "grpo":
    no_spread = rewards.max(axis=1) == rewards.min(axis=1)
    return {"train/zero_advantage_groups": no_spread.sum(),
            "train/advantage_abs_mean": jnp.abs(inputs.advantages).mean()}
  if name == "sft":
    verified = inputs.rollout_mask.reshape(rewards.shape)
    return {"train/verified_fraction": verified.mean(),
            "train/groups_without_verified": (~verified.any(axis=1)).sum()}
  if name in ("dpo", "simpo"):
    pairs = losses.group_pairs(rewards)
    return {"train/num_pairs": pairs.num_pairs.sum(),
            "train/groups_without_pairs": pairs.num_empty_groups}
  return {}


def update(cfg: StepConfig, optimizer, pieces, state: TrainState, batch,
           rollouts: Rollouts, peer_key):
  """Everything after verification, in the order it runs: peers and teacher prompts ->
  teacher scoring -> loss and gradient -> optimizer and EMA update -> metrics."""
  inputs = build_teacher_inputs(cfg, pieces, batch, rollouts, peer_key)
  loss, grads, student_logp, teacher_logp = loss_and_grads(cfg, state, inputs, rollouts)
  new_state, grad_norm, finite = apply_update(cfg, optimizer, state, loss, grads)
  metrics = step_metrics(inputs, rollouts, loss, grad_norm, finite, student_logp,
                         teacher_logp)
  if rollouts.summary_missing is not None:
    metrics["train/summary_missing_fraction"] = rollouts.summary_missing.mean(
        dtype=jnp.float32)
  return new_state, {**metrics, **algorithm_metrics(cfg, inputs, rollouts)}


def _verify(cfg, mesh, host_fn, batch, out: SampleOutput) -> Rollouts:
  ids = jnp.repeat(batch["example_id"], cfg.num_samples, axis=0)
  rewards, status, feedback, feedback_lengths = callback.verify_on_device(
      mesh, host_fn, ids, out.tokens, out.lengths, feedback_len=max(cfg.peers.feedback_len, 1))
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
    batch = student_prompts(cfg.peers, pieces, batch, cfg.pad_id)
    sample_key, peer_key = step_keys(state)
    out = cfg.sampler(state.params, batch["prompt_tokens"], batch["prompt_mask"],
                      sample_key)
    rollouts = _verify(cfg, mesh, host_fn, batch, out)
    return update(cfg, optimizer, pieces, state, batch, rollouts, peer_key)

  # The template pieces are a few small constants: closed over, not arguments.
  return sharding.UnderRules(
      jax.jit(step, in_shardings=(shardings, batch_shardings(mesh)),
              out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,)),
      mesh)


def make_split_step(cfg: StepConfig, mesh, host_fn: Callable, optimizer, pieces,
                    shardings: TrainState):
  """The same step as jit(sample) -> host verify -> jit(update)."""

  def sample_fn(state, batch):
    batch = student_prompts(cfg.peers, pieces, batch, cfg.pad_id)
    sample_key, _ = step_keys(state)
    return cfg.sampler(state.params, batch["prompt_tokens"], batch["prompt_mask"],
                       sample_key)

  sample_fn = sharding.UnderRules(jax.jit(sample_fn), mesh)

  def update_fn(state, batch, rollouts):
    batch = student_prompts(cfg.peers, pieces, batch, cfg.pad_id)
    _, peer_key = step_keys(state)
    return update(cfg, optimizer, pieces, state, batch, rollouts, peer_key)

  update_jit = sharding.UnderRules(
      jax.jit(update_fn, in_shardings=(shardings, batch_shardings(mesh), None),
              out_shardings=(shardings, sharding.replicated(mesh))), mesh)

  def step(state, batch):
    out = jax.device_get(sample_fn(state, batch))
    ids = jax.device_get(batch["example_id"]).repeat(cfg.num_samples)
    rewards, status, feedback, feedback_lengths = host_fn(ids, out.tokens, out.lengths)
    summaries = {}
    if cfg.peers.summaries:
      summaries = dict(zip(("summaries", "summary_lengths", "summary_missing"),
                           host_fn.summarize(out.tokens, out.lengths)))
    rollouts = Rollouts(tokens=out.tokens, logprobs=out.logprobs, lengths=out.lengths,
                        finished=out.finished, rewards=rewards, status=status,
                        feedback=feedback, feedback_lengths=feedback_lengths, **summaries)
    return update_jit(state, batch, rollouts)

  return step
