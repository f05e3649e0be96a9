"""Base of the distillation algorithms (mopd, sdpo, opd): a divergence to a teacher.

Stage 2 scores the rollouts with the teacher slot (`step_teacher.teacher_terms`: the EMA,
frozen or external teacher, or the trust region); stage 3 is the chunked top-k divergence
of the loss section, weighted by the aggregation mode.
"""

from __future__ import annotations

import jax.numpy as jnp

from mopd_jax import step_losses, step_teacher
from mopd_jax.algorithms import registry


class Distillation(registry.Algorithm):
  """A divergence between the student and a teacher that reads the teacher prompt."""

  # MOPD spec §3: the distillation methods' effective aggregation.
  default_aggregation = "token-mean"

  def rollout_mask(self, cfg, rollouts, num_prompts):
    """Without a peer context every rollout enters the loss."""
    del cfg, num_prompts
    return jnp.ones(rollouts.rewards.shape, bool)

  def advantages(self, cfg, rollouts, num_prompts):
    del cfg, num_prompts
    return jnp.zeros(rollouts.rewards.shape, jnp.float32)

  def teacher_signal(self, cfg, teacher_params, student_params, inputs, rollouts):
    return step_teacher.teacher_terms(cfg, teacher_params, student_params, inputs, rollouts)

  def loss(self, cfg, params, inputs, rollouts, signal, weights):
    return step_losses.distillation_loss(cfg, params, inputs, rollouts, signal, weights)

  def loss_weights(self, cfg, inputs):
    return step_losses.aggregation_weights(cfg, inputs)
