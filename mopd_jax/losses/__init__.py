"""Distillation losses, importance weights and token aggregation for MOPD.

Divergences (per token, between the student distribution S and the teacher
distribution T over the vocabulary, or over a top-k support plus a tail
bucket):

* ``alpha = 0``: forward KL, ``KL(T || S) = sum_v T_v (log T_v - log S_v)``
  (mode covering, the supervised-distillation objective).
* ``alpha = 1``: reverse KL, ``KL(S || T) = sum_v S_v (log S_v - log T_v)``
  (mode seeking, the on-policy distillation objective).
* ``0 < alpha < 1``: generalised Jensen-Shannon divergence with mixture
  ``M = (1 - alpha) S + alpha T``:
  ``(1 - alpha) KL(S || M) + alpha KL(T || M)``; ``alpha = 0.5`` is the
  symmetric JSD.

With ``top_k = k`` both distributions are restricted to the student's k most
likely tokens, either renormalised or completed by a tail bucket holding the
remaining probability mass, so the divergence needs at most k + 1 values per side.

Memory and compute: a full-vocabulary loss over ``[N, L]`` positions would
materialise ``[N, L, V]`` float32 logits for the student and the teacher (plus
their gradients), which dominates memory for large vocabularies.
``chunked_distillation`` scans over position chunks and, when differentiated,
computes each chunk's gradient in the same pass (a custom VJP), so only
``[N, chunk_size, V]`` logits are live at any time and each vocabulary
projection is computed once.
"

The package: `divergence` (per-token divergences, weights, aggregation),
`distillation` (the chunked loss with its custom VJP), `baselines` (GRPO, DPO, SimPO,
verified SFT and their helpers). Everything public is importable from `mopd_jax.losses`.
"""

from mopd_jax.losses.baselines import (GroupPairs, chunked_token_logp, dpo_loss,
                                       group_pairs, grpo_advantages, grpo_per_token,
                                       simpo_loss, verified_sft_per_token)
from mopd_jax.losses.distillation import (Distillation, chunked_distillation)
from mopd_jax.losses.divergence import (AGGREGATION_MODES, aggregate, aggregation_weights,
                                        importance_clip_weights, per_token_divergence,
                                        rollout_correction_weights)
