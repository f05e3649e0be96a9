"""The losses of one step: distillation for mopd, sdpo and opd, a policy loss otherwise.

A step runs sample -> verify -> teacher inputs -> losses -> update (`train_step`). This
module is stage 3: from the `step_teacher.TeacherInputs` of stage 1 (and, to distil, the
teacher's `step_teacher.TeacherTerms` of stage 2), the student's forward and its loss,
weighted per token by `loss_weights` of the whole batch so that
`train_step.loss_and_grads` can sum it over row micro-batches. `algorithm_metrics`
reports what each policy loss could use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from mopd_jax import losses, step_teacher
from mopd_jax.models import transformer

if TYPE_CHECKING:  # train_step imports this module: its types serve as annotations only.
  from mopd_jax.train_step import Rollouts, StepConfig


def distillation_loss(cfg: StepConfig, params, inputs: step_teacher.TeacherInputs,
                      rollouts: Rollouts, terms: step_teacher.TeacherTerms, weights):
  """Stage 3: the student's forward and the weighted top-k divergence.

  weights: float32 [N, Lr] from `losses.aggregation_weights` of the whole batch, so
  that the sum of this function over row micro-batches is the batch's loss.
  Returns (loss, (student log-prob of each response token, teacher's)), both [N, Lr].
  """
  lc = cfg.loss
  student_hidden = step_teacher.response_hidden(cfg.model, params, inputs.prompt_tokens,
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
                 inputs: step_teacher.TeacherInputs, rollouts: Rollouts):
  """float32 [N, Lr] log-probs of the response tokens at the sampling temperature."""
  hidden = step_teacher.response_hidden(model_cfg, params, prompt_tokens, prompt_mask,
                                        rollouts.tokens, inputs.response_mask)
  return losses.chunked_token_logp(hidden, transformer.lm_head(model_cfg, params),
                                   rollouts.tokens, temperature=cfg.sampling.temperature,
                                   chunk_size=cfg.loss.chunk_size)


def reference_logp(cfg: StepConfig, teacher_params, inputs: step_teacher.TeacherInputs,
                   rollouts: Rollouts):
  """Stage 2 of dpo: the reference model's response log-probs [N, Lr] on the plain
  prompt (the frozen initial student, kept in the teacher slot); None otherwise."""
  if cfg.algorithm.name != "dpo":
    return None
  return jax.lax.stop_gradient(_policy_logp(
      cfg, cfg.teacher_cfg, jax.lax.stop_gradient(teacher_params), inputs.teacher_tokens,
      inputs.teacher_mask, inputs, rollouts))


def policy_loss(cfg: StepConfig, params, inputs: step_teacher.TeacherInputs, rollouts: Rollouts,
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


def loss_weights(cfg: StepConfig, inputs: step_teacher.TeacherInputs):
  """float32 [N, Lr] weights of the whole batch: the loss is sum(per_token * weights).

  sft: 1 / (number of verified rollouts) on their tokens (its per-token loss is already
  length-normalised); the others: `losses.aggregation_weights` of the loss mask.
  """
  if cfg.algorithm.name == "sft":
    count = jnp.maximum(inputs.rollout_mask.sum(), 1).astype(jnp.float32)
    return inputs.loss_mask.astype(jnp.float32) / count
  return losses.aggregation_weights(inputs.loss_mask, cfg.loss.aggregation)


def algorithm_metrics(cfg: StepConfig, inputs: step_teacher.TeacherInputs, rollouts: Rollouts):
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
