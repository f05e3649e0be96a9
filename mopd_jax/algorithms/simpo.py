"""SimPO (MOPD spec §6): length-normalised preference loss with beta, target margin gamma
and optional label smoothing, over the on-policy pairs of a group; no reference model."""

from __future__ import annotations

from mopd_jax import losses, step_losses
from mopd_jax.algorithms import policy, registry


@registry.register("simpo")
class SimPO(policy.PairLoss):

  def loss(self, cfg, params, inputs, rollouts, signal, weights):
    del signal, weights  # no reference; averaged over the valid pairs of the whole batch
    al = cfg.algorithm
    logp = step_losses.student_logp(cfg, params, inputs, rollouts)
    seq, chosen, rejected, valid = self.pair_terms(cfg, inputs, rollouts, logp)
    length = inputs.response_mask.sum(axis=1).astype(logp.dtype)
    per_pair = losses.simpo_loss(seq[chosen], seq[rejected], length[chosen],
                                 length[rejected], beta=al.simpo_beta, gamma=al.simpo_gamma,
                                 label_smoothing=al.simpo_label_smoothing)
    return self.mean_over_valid(per_pair, valid), step_losses.stopped(logp)
