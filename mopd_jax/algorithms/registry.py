"""The algorithm protocol and the registry of algorithms by name (no JAX imported here).

An algorithm is a subclass of `Algorithm` registered under a name:

    @registry.register("mopd")
    class MOPD(distillation.Distillation):
      peer_context = True

and `get(name)` returns its one instance. `config.algorithm.name` names it; the step
(`StepConfig.method`) and the settings (`Settings`, for `check`) look it up once. The
built-in algorithms are imported on the first lookup, so that importing this module (and
`mopd_jax.settings`) stays free of JAX.

What an algorithm decides, in the order a step runs:
- `peer_context`: the teacher reads the peer context of `config.peers` (else the plain
  prompt, with the rollouts of `rollout_mask` in the loss);
- `rollout_mask`: without a peer context, the rollouts in its loss (default: all);
- `advantages`: float32 [N] per-rollout advantages its loss uses (default: zeros);
- `teacher_signal`: stage 2, what its loss needs from the teacher slot (the teacher's
  `TeacherTerms` to distil, a reference model's log-probs, or None);
- `loss`: stage 3, the student's forward and the weighted loss;
- `loss_weights`: float32 [N, Lr] weights of the whole batch (the loss is their weighted
  sum, so it splits over row micro-batches);
- `metrics`: what its loss could use, reported per step;
- `default_aggregation` (when `config.loss.aggregation` is None) and `check`: its
  cross-section rules on the whole `Settings`;
- `supports_packing`: whether it runs on packed rows (`config.optim.packed_tokens`,
  `mopd_jax.packing`), through `packed_teacher_signal` and `packed_loss`.
"""

from __future__ import annotations

import abc
import importlib
from typing import Any, ClassVar

from mopd_jax.choices import ConfigError

# Modules of mopd_jax.algorithms that register the built-in algorithms.
BUILTIN_MODULES = ("mopd", "sdpo", "opd", "grpo", "sft", "dpo", "simpo")

_REGISTRY: dict[str, "Algorithm"] = {}
_builtins_loaded = False


class Algorithm(abc.ABC):
  """One training method; see the module docstring for what each member decides."""

  name: ClassVar[str] = ""  # set by `register`
  peer_context: ClassVar[bool] = False
  # Whether it reads the summaries variant of the peer context (config.peers.summaries).
  reads_summaries: ClassVar[bool] = False
  default_aggregation: ClassVar[str] = "token-mean"
  # Whether its loss runs on packed rows (a per-token loss whose weights carry the rows').
  supports_packing: ClassVar[bool] = False

  def check(self, st) -> None:
    """Raises `ConfigError` for settings `st` this algorithm cannot run."""
    if st.optim.packed_tokens and not self.supports_packing:
      raise ConfigError(
          f"Invalid config.optim.packed_tokens = {st.optim.packed_tokens} with "
          f"config.algorithm.name = {self.name!r}: its loss reads whole rows (sequence "
          "log-probs, per-row advantages or rewards), which packed rows do not keep; "
          "packing runs with the distillation algorithms (mopd, sdpo, opd). Set "
          "config.optim.packed_tokens to 0.")
    if st.peers.summaries and not self.reads_summaries:
      raise ConfigError(
          f"Invalid config.peers.summaries = True with config.algorithm.name = "
          f"{self.name!r}: the summaries variant is a context of the mopd teacher; set "
          "config.algorithm.name to 'mopd' or config.peers.summaries to False.")

  def rollout_mask(self, cfg, rollouts, num_prompts: int):
    """bool [N]: the rollouts in the loss when the teacher reads the plain prompt;
    None (the default) = all of them."""
    del cfg, rollouts, num_prompts

  def advantages(self, cfg, rollouts, num_prompts: int):
    """float32 [N] per-rollout advantages; None (the default) = zeros."""
    del cfg, rollouts, num_prompts

  @abc.abstractmethod
  def teacher_signal(self, cfg, teacher_params, student_params, inputs, rollouts) -> Any:
    """Stage 2: what `loss` takes from the teacher slot (stop-gradient), or None."""

  @abc.abstractmethod
  def loss(self, cfg, params, inputs, rollouts, signal, weights):
    """Stage 3: (loss, (student log-prob [N, Lr], teacher / reference log-prob [N, Lr]))."""

  @abc.abstractmethod
  def loss_weights(self, cfg, inputs):
    """float32 [N, Lr] weights of the whole batch."""

  def packed_teacher_signal(self, cfg, teacher_params, student_params, rows) -> Any:
    """Stage 2 on one micro-batch of `packing.PackedRows` (supports_packing only)."""
    raise ConfigError(f"config.algorithm.name = {self.name!r} does not run on packed rows; "
                      "set config.optim.packed_tokens = 0.")

  def packed_loss(self, cfg, params, rows, signal):
    """Stage 3 on `packing.PackedRows`: (loss, (student log-prob [P, Lr], teacher's
    [P, Lr])) in the loss layout, weighted by `rows.weights` (supports_packing only)."""
    raise ConfigError(f"config.algorithm.name = {self.name!r} does not run on packed rows; "
                      "set config.optim.packed_tokens = 0.")

  def metrics(self, cfg, inputs, rollouts) -> dict:
    """Scalar metrics of what the loss could use (none by default)."""
    del cfg, inputs, rollouts
    return {}

  def __repr__(self):
    return f"<algorithm {self.name!r}>"


def register(name: str):
  """Class decorator: registers one instance of an `Algorithm` subclass under `name`."""
  if not isinstance(name, str) or not name.isidentifier():
    raise ValueError(f"An algorithm name must be an identifier, got {name!r}.")

  def wrap(cls):
    _load_builtins()  # the built-in names first, so that no later module can take them
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
      raise TypeError(f"@register({name!r}) takes a subclass of Algorithm, got {cls!r}.")
    if name in _REGISTRY:
      raise ValueError(f"An algorithm named {name!r} is already registered "
                       f"({type(_REGISTRY[name]).__module__}).")
    cls.name = name
    _REGISTRY[name] = cls()
    return cls

  return wrap


def _load_builtins():
  """Imports the built-in algorithms once (they register themselves)."""
  global _builtins_loaded
  if not _builtins_loaded:
    _builtins_loaded = True
    for module in BUILTIN_MODULES:
      importlib.import_module(f"mopd_jax.algorithms.{module}")


def names() -> tuple[str, ...]:
  """The registered algorithm names, built-ins first."""
  _load_builtins()
  return tuple(_REGISTRY)


def get(name: str) -> Algorithm:
  """The algorithm registered as `name`; a ConfigError naming the registered ones if none."""
  _load_builtins()
  if name not in _REGISTRY:
    raise ConfigError(f"Invalid config.algorithm.name = {name!r}: must be one of "
                     f"{list(_REGISTRY)} (or a name registered with "
                     "mopd_jax.algorithms.register).")
  return _REGISTRY[name]
