"""SDPO (MOPD spec §6): MOPD's machinery with the 1S context, the first other success,
plus the rollout's own feedback where `config.peers.include_feedback` (on by default, only
without a solution); the authors also run it without feedback.

The 1S context is the user's to set: `config.peers.include_another=False` and
`config.peers.include_failure=False` (primary on, no control, no summaries); any other
peers setting is an error that names the keys, never changed behind the user's back.
"""

from mopd_jax.algorithms import distillation, registry
from mopd_jax.choices import ConfigError

# The peers knobs of the 1S context.
ONE_S = {"include_primary": True, "include_another": False, "include_failure": False,
         "control": ""}


@registry.register("sdpo")
class SDPO(distillation.Distillation):
  peer_context = True

  def check(self, st):
    super().check(st)
    wrong = {key: getattr(st.peers, key) for key, value in ONE_S.items()
             if getattr(st.peers, key) != value}
    if wrong:
      given = ", ".join(f"config.peers.{key} = {value!r}" for key, value in wrong.items())
      flags = " ".join(f"--config.peers.{key}={ONE_S[key]!r}" for key in wrong)
      raise ConfigError(
          f"Invalid {given} with config.algorithm.name = 'sdpo': SDPO's teacher reads the 1S "
          "context (the first other success, and the own feedback with include_feedback); "
          f"set {flags}, or use algorithm 'mopd' for other contexts.")
