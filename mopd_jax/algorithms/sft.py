"""Verified SFT (MOPD spec §6): length-normalised NLL of the rollouts with
reward >= success threshold, averaged over them."""

from __future__ import annotations

import jax.numpy as jnp

from mopd_jax import losses, step_losses
from mopd_jax.algorithms import policy, registry


@registry.register("sft")
class VerifiedSFT(policy.PolicyLoss):

  def rollout_mask(self, cfg, rollouts, num_prompts):
    """The verified rollouts (reward >= threshold, at least one token)."""
    del num_prompts
    return (rollouts.rewards >= cfg.success_threshold) & (rollouts.lengths > 0)

  def loss_weights(self, cfg, inputs):
    """1 / (number of verified rollouts) on their tokens: the per-token loss is already
    length-normalised."""
    count = jnp.maximum(inputs.rollout_mask.sum(), 1).astype(jnp.float32)
    return inputs.loss_mask.astype(jnp.float32) / count

  def loss(self, cfg, params, inputs, rollouts, signal, weights):
    logp = step_losses.student_logp(cfg, params, inputs, rollouts)
    per_token, _ = losses.verified_sft_per_token(logp, inputs.response_mask,
                                                 rollouts.rewards,
                                                 threshold=cfg.success_threshold)
    return step_losses.weighted_sum(per_token, weights), step_losses.stopped(logp)

  def metrics(self, cfg, inputs, rollouts):
    """Verified rollouts and groups without one."""
    verified = inputs.rollout_mask.reshape(-1, cfg.num_samples)
    return {"train/verified_fraction": verified.mean(),
            "train/groups_without_verified": (~verified.any(axis=1)).sum()}
