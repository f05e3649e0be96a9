"""MOPD (MOPD spec §1-§3): the teacher reads the peer context of `config.peers`
(2S1F by default, matched-budget controls and the summaries variant included)."""

from mopd_jax.algorithms import distillation, registry


@registry.register("mopd")
class MOPD(distillation.Distillation):
  peer_context = True
  reads_summaries = True
