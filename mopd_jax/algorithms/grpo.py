"""GRPO (MOPD spec §6): group-relative advantages r - mean(group r) (optionally divided by
the group's std), PPO clip low / high with a dual clip, token-mean, no KL."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mopd_jax import losses, step_losses
from mopd_jax.algorithms import policy, registry


@registry.register("grpo")
class GRPO(policy.PolicyLoss):

  def advantages(self, cfg, rollouts, num_prompts):
    return losses.grpo_advantages(
        rollouts.rewards.reshape(num_prompts, -1),
        normalize_std=cfg.algorithm.grpo_normalize_std).reshape(-1)

  def loss(self, cfg, params, inputs, rollouts, signal, weights):
    al = cfg.algorithm
    logp = step_losses.student_logp(cfg, params, inputs, rollouts)  # [N, Lr]
    # One update per batch: the sampling policy is the current one, so the ratio is 1 in
    # value and the gradient is the clipped surrogate's at 1.
    per_token = losses.grpo_per_token(
        logp, jax.lax.stop_gradient(logp), inputs.advantages, clip_low=al.grpo_clip_low,
        clip_high=al.grpo_clip_high, dual_clip=al.grpo_dual_clip)
    return step_losses.weighted_sum(per_token, weights), step_losses.stopped(logp)

  def metrics(self, cfg, inputs, rollouts):
    """Groups whose rewards are all equal (zero advantage)."""
    rewards = step_losses.group_rewards(cfg, rollouts)
    no_spread = rewards.max(axis=1) == rewards.min(axis=1)
    return {"train/zero_advantage_groups": no_spread.sum(),
            "train/advantage_abs_mean": jnp.abs(inputs.advantages).mean()}
