"""Base of the policy-loss algorithms (grpo, sft, dpo, simpo): no teacher context.

The teacher reads the plain prompt; the losses use the student's log-probs at the
sampling temperature. The rollout correction of the loss section applies to
distillation only.
"""

from __future__ import annotations

import jax.numpy as jnp

from mopd_jax import losses, step_losses
from mopd_jax.algorithms import registry
from mopd_jax.choices import ConfigError


class PolicyLoss(registry.Algorithm):
  """A loss on the student's own log-probs; no teacher signal unless overridden."""

  def teacher_signal(self, cfg, teacher_params, student_params, inputs, rollouts):
    del cfg, teacher_params, student_params, inputs, rollouts
    return None

  def loss_weights(self, cfg, inputs):
    return step_losses.aggregation_weights(cfg, inputs)


class PairLoss(PolicyLoss):
  """A preference loss over the on-policy pairs of a group (r_a > r_b): averaged over
  the valid pairs of the whole batch, so it cannot split over row micro-batches."""

  def check(self, st):
    super().check(st)
    if 0 < st.optim.micro_batch_rows < st.rows:
      raise ConfigError(
          f"Invalid config.optim.micro_batch_rows = {st.optim.micro_batch_rows} with "
          f"config.algorithm.name = {self.name!r}: a preference pair spans two rows of a "
          "group, so pair losses run on the whole batch; set micro_batch_rows to 0.")

  def rollout_mask(self, cfg, rollouts, num_prompts):
    """Rollouts of groups with at least one pair of different rewards."""
    rewards = rollouts.rewards.reshape(num_prompts, -1)
    has_pair = rewards.max(axis=1) > rewards.min(axis=1)  # [B]
    return jnp.repeat(has_pair, rewards.shape[1])

  def pair_terms(self, cfg, inputs, rollouts, logp):
    """(sequence log-probs [N], chosen [B*P], rejected [B*P], valid [B*P])."""
    seq_logp = jnp.sum(jnp.where(inputs.response_mask, logp, 0.0), axis=1)
    pairs = losses.group_pairs(step_losses.group_rewards(cfg, rollouts))
    return (seq_logp, pairs.chosen.reshape(-1), pairs.rejected.reshape(-1),
            pairs.valid.reshape(-1))

  @staticmethod
  def mean_over_valid(per_pair, valid):
    return jnp.sum(jnp.where(valid, per_pair, 0.0)) / jnp.maximum(valid.sum(), 1)

  def metrics(self, cfg, inputs, rollouts):
    pairs = losses.group_pairs(step_losses.group_rewards(cfg, rollouts))
    return {"train/num_pairs": pairs.num_pairs.sum(),
            "train/groups_without_pairs": pairs.num_empty_groups}
