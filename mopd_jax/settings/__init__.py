"""Run settings: one frozen dataclass per config section, each knob defined once.

A knob is a dataclass field made with `knob(default, ok, allowed, doc)`: its default, its
check and the sentence that names what is allowed sit together. `section(name)` turns a
dataclass's defaults into the `ConfigDict` section that a config file starts from (so a
new knob appears in every config file and on the command line without further edits),
and `from_config(config)` builds and validates every section once, at start-up:

    config.loss    -> LossSettings        config.peers   -> PeerSettings
    config.sampling-> SamplingSettings    config.teacher -> TeacherSettings
    config.optim   -> OptimSettings       config.algorithm -> AlgorithmSettings
    config.model   -> ModelSettings       config.data    -> DataSettings
    config.verifier-> VerifierSettings    config.eval    -> EvalSettings
    config.mesh    -> MeshSettings        config.distributed -> DistributedSettings
    top-level keys -> RunSettings

The package: `knobs` (the checks, `knob`, the `_Section` base), `run_sections` (run,
model, data, sampling, verifier, eval, mesh, distributed), `method_sections` (peers, loss,
teacher, optim, algorithm), and here the whole `Settings` and the ConfigDict functions;
every name is importable as `mopd_jax.settings.<name>`.

The dataclasses are hashable, so the step takes them as static configuration. Every
error is a `ConfigError` that names the key, the value and what is allowed. Allowed
values come from `mopd_jax.choices`; the checks that span sections (those of the
algorithm included: `Algorithm.check`) run once, when `Settings` is built. Importing
this package imports no JAX.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from mopd_jax.algorithms import registry
from mopd_jax.choices import ConfigError
from mopd_jax.settings.knobs import knob
from mopd_jax.settings.method_sections import (AlgorithmSettings, LossSettings,
                                               OptimSettings, PeerSettings, TeacherSettings)
from mopd_jax.settings.run_sections import (DATA_TASKS, DISTRIBUTED_MODES, OVERLONG_MODES,
                                            DataSettings, DistributedSettings, EvalSettings,
                                            MeshSettings, ModelSettings, RunSettings,
                                            SamplingSettings, VerifierSettings)

__all__ = ["AlgorithmSettings", "ConfigError", "DATA_TASKS", "DISTRIBUTED_MODES",
           "DataSettings", "DistributedSettings", "EvalSettings", "LossSettings",
           "MeshSettings", "ModelSettings", "OVERLONG_MODES", "OptimSettings",
           "PeerSettings", "RunSettings", "SECTIONS", "SamplingSettings", "Settings",
           "TeacherSettings", "VerifierSettings", "base_config", "from_config", "knob",
           "section", "to_dict"]


SECTIONS = {cls.NAME: cls for cls in (
    ModelSettings, DataSettings, SamplingSettings, VerifierSettings, PeerSettings,
    LossSettings, TeacherSettings, OptimSettings, AlgorithmSettings, EvalSettings,
    MeshSettings, DistributedSettings)}


@dataclasses.dataclass(frozen=True)
class Settings:
  """All sections of a run config, validated."""

  run: RunSettings
  model: ModelSettings
  data: DataSettings
  sampling: SamplingSettings
  verifier: VerifierSettings
  peers: PeerSettings
  loss: LossSettings
  teacher: TeacherSettings
  optim: OptimSettings
  algorithm: AlgorithmSettings
  eval: EvalSettings
  mesh: MeshSettings
  distributed: DistributedSettings

  def __post_init__(self):
    if self.peers.summaries and self.sampling.num_samples < 2:
      raise ConfigError(
          f"Invalid config.peers.summaries = True with config.sampling.num_samples = "
          f"{self.sampling.num_samples}: summaries come from other members of a group, so "
          "num_samples must be at least 2.")
    mb = self.optim.micro_batch_rows
    if mb and self.rows % mb:
      divisors = [d for d in range(1, self.rows + 1) if self.rows % d == 0]
      raise ConfigError(
          f"Invalid config.optim.micro_batch_rows = {mb}: it must divide the "
          f"{self.rows} rows of a step (data.batch_size {self.data.batch_size} x "
          f"sampling.num_samples {self.sampling.num_samples}); divisors: {divisors}, "
          "or 0 for one batch.")
    # The algorithm's own rules and defaults (loads the built-in algorithms on first use).
    method = registry.get(self.algorithm.name)
    method.check(self)
    if self.loss.aggregation is None:
      object.__setattr__(self, "loss", dataclasses.replace(
          self.loss, aggregation=method.default_aggregation))

  @property
  def rows(self) -> int:
    """Sequences per step: prompts x rollouts per prompt."""
    return self.data.batch_size * self.sampling.num_samples


# ------------------------------------------------------------------ ConfigDict <-> settings.

def section(name: str, **overrides) -> ml_collections.ConfigDict:
  """The ConfigDict of section `name` with its defaults, then `overrides` applied."""
  cls = SECTIONS[name] if name else RunSettings
  values = {}
  for f in dataclasses.fields(cls):
    value = overrides.pop(f.name, f.default)
    if value is None and f.metadata["kind"] is not None:
      value = ml_collections.config_dict.placeholder(f.metadata["kind"])
    values[f.name] = value
  if overrides:
    raise ConfigError(f"Unknown key(s) {[cls.key(k) for k in sorted(overrides)]}.")
  return ml_collections.ConfigDict(values)


def base_config(**run_overrides) -> ml_collections.ConfigDict:
  """A full config with every section at its defaults (config files start here)."""
  c = section("", **run_overrides)
  for name in SECTIONS:
    c[name] = section(name)
  return c


def from_config(config) -> Settings:
  """Validates `config` (a ConfigDict or nested dict) and builds every section."""
  values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  missing = [name for name in SECTIONS if name not in values]
  if missing:
    raise ConfigError(f"Config section(s) {missing} are missing; a config needs "
                      f"{sorted(SECTIONS)}.")
  built = {name: SECTIONS[name].from_section(dict(values.pop(name))) for name in SECTIONS}
  return Settings(run=RunSettings.from_section(values), **built)


def to_dict(st: Settings) -> dict:
  """The resolved settings in the layout of a config file (run keys at the top)."""
  values = dataclasses.asdict(st)
  return {**values.pop("run"), **values}
