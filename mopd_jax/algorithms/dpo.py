"""On-policy DPO (MOPD spec §6): pairs (a, b) of a group with r_a > r_b, beta
`algorithm.dpo_beta`; the reference model is the frozen initial student, kept in the
teacher slot (so teacher.mode must be 'frozen')."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mopd_jax import losses, step_losses
from mopd_jax.algorithms import policy, registry
from mopd_jax.choices import ConfigError


@registry.register("dpo")
class DPO(policy.PairLoss):

  def check(self, st):
    if st.teacher.mode != "frozen":
      raise ConfigError(
          f"Invalid config.teacher.mode = {st.teacher.mode!r} with config.algorithm.name = "
          "'dpo': DPO's reference model is the initial student, kept in the teacher slot, "
          "so the teacher mode must be 'frozen'.")
    super().check(st)

  def teacher_signal(self, cfg, teacher_params, student_params, inputs, rollouts):
    """The reference model's response log-probs [N, Lr] on the plain prompt."""
    del student_params
    return jax.lax.stop_gradient(step_losses.policy_logp(
        cfg, cfg.teacher_cfg, jax.lax.stop_gradient(teacher_params), inputs.teacher_tokens,
        inputs.teacher_mask, inputs, rollouts))

  def loss(self, cfg, params, inputs, rollouts, signal, weights):
    del weights  # averaged over the valid pairs of the whole batch
    logp = step_losses.student_logp(cfg, params, inputs, rollouts)
    seq, chosen, rejected, valid = self.pair_terms(cfg, inputs, rollouts, logp)
    ref_seq = jnp.sum(jnp.where(inputs.response_mask, signal, 0.0), axis=1)
    per_pair = losses.dpo_loss(seq[chosen], seq[rejected], ref_seq[chosen],
                               ref_seq[rejected], beta=cfg.algorithm.dpo_beta)
    return self.mean_over_valid(per_pair, valid), step_losses.stopped(logp, signal)
