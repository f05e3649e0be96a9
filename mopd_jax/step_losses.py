"""The shared pieces of stage 3 that the algorithms (`mopd_jax.algorithms`) compose.

A step runs sample -> verify -> teacher inputs -> losses -> update (`train_step`). From
the `TeacherInputs` of stage 1 (and, to distil, the teacher's `TeacherTerms` of stage 2)
an algorithm's loss runs the student's forward and weights its per-token loss by weights
of the whole batch (`aggregation_weights`), so that `train_step.loss_and_grads` can sum
it over row micro-batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mopd_jax import losses, packing, step_teacher
from mopd_jax.models import transformer
from mopd_jax.step_types import Rollouts, StepConfig, TeacherInputs, TeacherTerms


def distillation_loss(cfg: StepConfig, params, inputs: TeacherInputs, rollouts: Rollouts,
                      terms: TeacherTerms, weights):
  """The student's forward and the weighted top-k divergence to the teacher's terms.

  weights: float32 [N, Lr] of the whole batch, so that the sum of this function over
  row micro-batches is the batch's loss.
  Returns (loss, (student log-prob of each response token, teacher's)), both [N, Lr].
  """
  student_hidden = step_teacher.response_hidden(cfg.model, params, inputs.prompt_tokens,
                                                inputs.prompt_mask, rollouts.tokens,
                                                inputs.response_mask)
  return _divergence(cfg, params, student_hidden, terms, rollouts.tokens, weights,
                     rollouts.logprobs)


def packed_distillation_loss(cfg: StepConfig, params, rows: packing.PackedRows,
                             terms: TeacherTerms):
  """`distillation_loss` on one micro-batch of packed rows (`mopd_jax.packing`): the
  student's forward over its packed layout, the divergence over the loss layout [P, Lr]
  with each token's whole-batch weight. Returns (loss, (student, teacher log-probs))
  in the loss layout."""
  student_hidden = step_teacher.packed_hidden(
      cfg.model, params, rows.student_tokens, rows.student_segments, rows.student_positions,
      rows.student_index, rows.shards)
  return _divergence(cfg, params, student_hidden, terms, rows.targets, rows.weights,
                     rows.sampler_logp)


def _divergence(cfg: StepConfig, params, student_hidden, terms: TeacherTerms, targets,
                weights, sampler_logp):
  """The chunked divergence of the loss section from the student's hidden states."""
  lc = cfg.loss
  # The sampler's log-probs are at the sampling temperature (1 for greedy decoding).
  correction = (dict(sampler_logp=sampler_logp,
                     correction_clip=lc.rollout_correction_clip,
                     sampler_temperature=cfg.sampling.temperature or 1.0)
                if lc.rollout_correction_clip > 0 else {})
  # Positions of weight 0 (masked, maybe garbage) do not enter the loss or its gradient.
  loss, _, student_logp, teacher_logp = losses.chunked_distillation(
      student_hidden, terms.hidden, transformer.lm_head(cfg.model, params),
      terms.head, targets, token_weights=weights,
      teacher_weights=terms.weights, alpha=lc.alpha, top_k=lc.top_k,
      add_tail=lc.add_tail, temperature=lc.temperature, chunk_size=lc.chunk_size,
      full_logit=lc.full_logit, **correction)
  return loss, (student_logp, teacher_logp)


def policy_logp(cfg: StepConfig, model_cfg, params, prompt_tokens, prompt_mask,
                inputs: TeacherInputs, rollouts: Rollouts):
  """float32 [N, Lr] log-probs of the response tokens at the sampling temperature."""
  hidden = step_teacher.response_hidden(model_cfg, params, prompt_tokens, prompt_mask,
                                        rollouts.tokens, inputs.response_mask)
  return losses.chunked_token_logp(hidden, transformer.lm_head(model_cfg, params),
                                   rollouts.tokens, temperature=cfg.sampling.temperature,
                                   chunk_size=cfg.loss.chunk_size)


def student_logp(cfg: StepConfig, params, inputs: TeacherInputs, rollouts: Rollouts):
  """The student's float32 [N, Lr] response log-probs on its own prompt."""
  return policy_logp(cfg, cfg.model, params, inputs.prompt_tokens, inputs.prompt_mask,
                     inputs, rollouts)


def weighted_sum(per_token, weights):
  """sum(per_token * weights), with positions of weight 0 (maybe garbage) left out."""
  return jnp.sum(jnp.where(weights != 0.0, per_token * weights, 0.0))


def aggregation_weights(cfg: StepConfig, inputs: TeacherInputs):
  """`losses.aggregation_weights` of the loss mask in the step's aggregation mode."""
  return losses.aggregation_weights(inputs.loss_mask, cfg.aggregation)


def group_rewards(cfg: StepConfig, rollouts: Rollouts):
  """float32 [B, G] rewards by group."""
  return rollouts.rewards.reshape(-1, cfg.num_samples)


def stopped(logp, ref_logp=None):
  """The (student, teacher-side) log-probs a loss returns for the step's metrics."""
  logp = jax.lax.stop_gradient(logp)
  return logp, logp if ref_logp is None else ref_logp
