"""Losses of MOPD and of its baselines; every public name is importable from here.

- `divergence`: per-token divergences between student and teacher (forward KL, reverse
  KL, generalised JSD; full vocabulary or top-k with a tail bucket), importance and
  rollout-correction weights, aggregation over tokens.
- `distillation`: the chunked distillation loss from hidden states, whose custom VJP
  forms each chunk's gradient in its forward pass.
- `baselines`: GRPO, DPO, SimPO, verified SFT, on-policy pairs within a group, chunked
  token log-probs.
"""

from mopd_jax.losses.baselines import (GroupPairs, chunked_token_logp, dpo_loss,
                                       group_pairs, grpo_advantages, grpo_per_token,
                                       simpo_loss, verified_sft_per_token)
from mopd_jax.losses.distillation import (Distillation, DistillationConfig,
                                          chunked_distillation, distill)
from mopd_jax.losses.divergence import (AGGREGATION_MODES, aggregate, aggregation_weights,
                                        importance_clip_weights, per_token_divergence,
                                        rollout_correction_weights)
