"""OPD (classic on-policy distillation, MOPD spec §6): the teacher reads the plain prompt,
no peers; every rollout enters the loss. Pair it with teacher.mode 'external' (or
'frozen') and loss.alpha = 1 (reverse KL)."""

from mopd_jax.algorithms import distillation, registry


@registry.register("opd")
class OPD(distillation.Distillation):
  peer_context = False
