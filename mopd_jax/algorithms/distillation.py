"""Base of the distillation algorithms (mopd, sdpo, opd): a divergence to a teacher.

Stage 2 scores the rollouts with the teacher slot (`step_teacher.teacher_terms`: the EMA,
frozen or external teacher, or the trust region); stage 3 is the chunked top-k divergence
of the loss section, weighted by the aggregation mode.
"""

from __future__ import annotations

from mopd_jax import step_losses, step_teacher
from mopd_jax.algorithms import registry


class Distillation(registry.Algorithm):
  """A divergence between the student and a teacher that reads the teacher prompt."""

  # MOPD spec §3: the distillation methods' effective aggregation.
  default_aggregation = "seq-mean-token-mean-all"
  # A per-token divergence: packed rows carry each token's weight (mopd_jax.packing).
  supports_packing = True

  def teacher_signal(self, cfg, teacher_params, student_params, inputs, rollouts):
    return step_teacher.teacher_terms(cfg, teacher_params, student_params, inputs, rollouts)

  def loss(self, cfg, params, inputs, rollouts, signal, weights):
    return step_losses.distillation_loss(cfg, params, inputs, rollouts, signal, weights)

  def loss_weights(self, cfg, inputs):
    return step_losses.aggregation_weights(cfg, inputs)

  def packed_teacher_signal(self, cfg, teacher_params, student_params, rows):
    return step_teacher.packed_teacher_terms(cfg, teacher_params, student_params, rows)

  def packed_loss(self, cfg, params, rows, signal):
    return step_losses.packed_distillation_loss(cfg, params, rows, signal)
