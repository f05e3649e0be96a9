"""SDPO (MOPD spec §6): MOPD's machinery with the 1S context, the first other success,
plus the rollout's own feedback where `config.peers.include_feedback` (on by default, only
without a solution); the authors also run it without feedback.

The 1S context is the user's to set: `config.peers.include_another=False` and
`config.peers.include_failure=False` (no control, no summaries); any other peers setting
is an error that names the keys, never changed behind the user's back.
"""

from mopd_jax.algorithms import distillation, registry
from mopd_jax.choices import ConfigError


@registry.register("sdpo")
class SDPO(distillation.Distillation):
  peer_context = True

  def check(self, st):
    super().check(st)
    pc = st.peers
    wrong = [key for key, off_1s in (
        ("include_primary", not pc.include_primary), ("include_another", pc.include_another),
        ("include_failure", pc.include_failure), ("control", pc.control)) if off_1s]
    if wrong:
      raise ConfigError(
          f"config.algorithm.name = 'sdpo' reads the 1S context (the first other success "
          f"and, with include_feedback, the own feedback), but config.peers.{wrong} of "
          "config.peers say otherwise: set --config.peers.include_primary=True "
          "--config.peers.include_another=False --config.peers.include_failure=False "
          "--config.peers.control='' (or use algorithm 'mopd' for other contexts).")
