"""The types one training step passes between its stages; a leaf of the import graph.

`TrainState` (what is checkpointed), `Rollouts` (sampled and verified responses),
`StepConfig` (the step's static settings), `TeacherInputs` (stage 1: prompts, teacher
prompts and masks) and `TeacherTerms` (stage 2: the teacher as weighted hidden states).
The step modules (`train_step`, `step_teacher`, `step_losses`) and the algorithms
(`mopd_jax.algorithms`) import them from here; this module imports none of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.struct
import jax

from mopd_jax import settings
from mopd_jax.algorithms import registry
from mopd_jax.models import transformer
from mopd_jax.sampling import Sampler, sampler_layout


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  params: Any
  opt_state: Any
  teacher_params: Any  # float32
  rng: jax.Array  # uint32 [2], raw PRNG key (checkpointable)


@flax.struct.dataclass
class Rollouts:
  """Sampled responses and their verification, row b*G + g = sample g of prompt b."""

  tokens: jax.Array  # int32 [N, Lr]
  logprobs: jax.Array  # float32 [N, Lr], sampler log-probs
  lengths: jax.Array  # int32 [N], incl. end-of-sequence token
  finished: jax.Array  # bool [N]
  rewards: jax.Array  # float32 [N]
  status: jax.Array  # int32 [N], see verifiers.callback.STATUS_CODES
  feedback: jax.Array  # int32 [N, Lf]
  feedback_lengths: jax.Array  # int32 [N]
  # Summaries variant only (else None): `HostVerifier.summarize` of every response.
  summaries: jax.Array | None = None  # int32 [N, summary_len], right-padded
  summary_lengths: jax.Array | None = None  # int32 [N]
  summary_missing: jax.Array | None = None  # int32 [N], 1 = no <summary> tag


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of the step (hashable): the sections of `mopd_jax.settings` it
  uses, the model's shapes and the tokenizer's special ids. `method` is the registered
  algorithm of `algorithm.name`, looked up once here."""

  model: transformer.ModelConfig
  sampling: settings.SamplingSettings
  peers: settings.PeerSettings
  loss: settings.LossSettings
  teacher: settings.TeacherSettings
  optim: settings.OptimSettings
  stop_ids: tuple[int, ...]
  pad_id: int
  success_threshold: float = 1.0
  # External teacher (classic OPD): its own shapes, same vocabulary. None = self-teacher.
  teacher_model: transformer.ModelConfig | None = None
  algorithm: settings.AlgorithmSettings = settings.AlgorithmSettings()
  method: registry.Algorithm = dataclasses.field(init=False)

  def __post_init__(self):
    object.__setattr__(self, "method", registry.get(self.algorithm.name))

  @classmethod
  def from_settings(cls, s: settings.Settings, model, tokenizer, teacher_model=None):
    return cls(model=model, sampling=s.sampling, peers=s.peers, loss=s.loss,
               teacher=s.teacher, optim=s.optim, stop_ids=tuple(tokenizer.stop_ids),
               pad_id=tokenizer.pad_id, success_threshold=s.verifier.success_threshold,
               teacher_model=teacher_model, algorithm=s.algorithm)

  @property
  def num_samples(self) -> int:
    return self.sampling.num_samples

  @property
  def aggregation(self) -> str:
    """loss.aggregation, or the algorithm's default when it is None."""
    return self.loss.aggregation or self.method.default_aggregation

  @property
  def sampler(self) -> Sampler:
    sp = self.sampling
    return Sampler(model=self.model, max_new_tokens=sp.max_response_len,
                   stop_ids=self.stop_ids, pad_id=self.pad_id,
                   temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p,
                   num_samples=sp.num_samples, decode_layers=sp.decode_layers,
                   decode_layout=sampler_layout(sp.decode_layout))

  @property
  def teacher_cfg(self) -> transformer.ModelConfig:
    return self.teacher_model or self.model


@flax.struct.dataclass
class TeacherInputs:
  """Stage 1's output: peers, teacher prompts and the masks the loss uses."""

  prompt_tokens: jax.Array  # int32 [N, Lp], student prompts, left-padded
  prompt_mask: jax.Array  # bool [N, Lp]
  teacher_tokens: jax.Array  # int32 [N, Ltp], teacher prompts, left-padded
  teacher_mask: jax.Array  # bool [N, Ltp]
  response_mask: jax.Array  # bool [N, Lr], True on response tokens (EOS included)
  rollout_mask: jax.Array  # bool [N], the rollout enters the loss (e.g. has a context block)
  advantages: jax.Array  # float32 [N], the algorithm's per-rollout advantages (else 0)
  success: jax.Array  # bool [B, G]

  @property
  def loss_mask(self):
    return self.response_mask & self.rollout_mask[:, None]


class TeacherTerms(NamedTuple):
  """The teacher as terms whose weighted logits sum to its logits (stop-gradient):
  logits = sum_i weights[i] * hidden[i] @ head[i]. One term, except for the trust region."""

  hidden: tuple[jax.Array, ...]  # each [N, Lr, D_i] on the response positions
  head: tuple[jax.Array, ...]  # each [D_i, V]
  weights: tuple[float, ...]  # static
