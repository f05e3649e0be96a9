"""The sections of the training method: peers, loss, teacher, optimiser, algorithm.

    config.peers   -> PeerSettings        config.loss    -> LossSettings
    config.teacher -> TeacherSettings     config.optim   -> OptimSettings
    config.algorithm -> AlgorithmSettings

Each is a frozen dataclass of knobs (`mopd_jax.settings.knobs`), validated when built.
Imports no JAX (the algorithm registry loads its algorithms on first use only).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from mopd_jax import choices
from mopd_jax.algorithms import registry
from mopd_jax.choices import ConfigError
from mopd_jax.settings.knobs import (_DTYPES, _Section, _bool, _int, _num, _one_of,
                                     _optional, _str, knob)


@dataclasses.dataclass(frozen=True)
class PeerSettings(_Section):
  """Peer context (MOPD spec §2); the defaults are 2S1F with condition 'always'."""

  NAME: ClassVar[str] = "peers"
  include_primary: bool = knob(True, _bool, "True or False")
  include_another: bool = knob(True, _bool, "True or False")
  include_failure: bool = knob(True, _bool, "True or False")
  failure_condition: str = knob("always", _one_of(choices.FAILURE_CONDITIONS),
                                f"one of {choices.FAILURE_CONDITIONS}")
  exclude_self_success: bool = knob(True, _bool, "True or False")
  include_feedback: bool = knob(
      True, _bool, "True or False",
      "The rollout's own verifier feedback as a block of its teacher prompt (the authors' "
      "default, for every algorithm with a peer context).")
  feedback_only_without_solution: bool = knob(
      True, _bool, "True or False", "Own feedback only when no primary solution is shown.")
  peer_cap: int = knob(2048, _int(1), "a positive integer", "Tokens per peer block.")
  feedback_len: int = knob(
      2000, _int(1), "a positive integer",
      "Token room of the rollout's own feedback in the teacher prompt. The feedback is "
      "first cut to 2,000 characters (the authors' limit); one with more tokens than this "
      "is cut here, logged and counted (summary.json's feedback_cut_rows).")
  control: str = knob(
      "", _one_of(("",) + choices.CONTROLS), f"'' (off) or one of {choices.CONTROLS}",
      "Matched-budget peer control: the 2S1F budget of every rollout filled with other "
      "peers (mopd_jax.peer_controls); success_only_matched labels its extra success as "
      "another successful solution.")
  control_budget: str = knob("blocks", _one_of(choices.BUDGETS),
                             f"one of {choices.BUDGETS}",
                             "Match the 2S1F budget by block count or by token count.")
  summaries: bool = knob(
      False, _bool, "True or False",
      "Summaries variant (algorithm mopd only): the student's prompt asks for a one-sentence "
      "<summary>; the teacher reads the summaries of num_summaries other group members "
      "(self and the shown primary excluded), each labelled successful or unsuccessful.")
  num_summaries: int = knob(7, _int(1), "a positive integer",
                            "Summaries shown per rollout (at most G - 1 are used).")
  summary_len: int = knob(64, _int(1), "a positive integer", "Tokens per summary shown.")
  summary_fallback_chars: int = knob(
      300, _int(1), "a positive integer",
      "A response without a <summary> tag contributes its first this many characters.")

  def check(self):
    if self.summaries and self.control:
      raise ConfigError(
          f"Invalid config.peers.summaries = True with config.peers.control = "
          f"{self.control!r}: a control matches the 2S1F budget, which summaries would "
          "exceed; set control to '' or summaries to False.")
    two_s_one_f = (self.include_primary and self.include_another and self.include_failure
                   and self.failure_condition == "always")
    if self.control and not two_s_one_f:
      raise ConfigError(
          f"Invalid config.peers.control = {self.control!r}: a control matches the 2S1F "
          "budget, so config.peers.include_primary, include_another and include_failure "
          "must be True and config.peers.failure_condition 'always'.")

  @property
  def feedback_room(self) -> int:
    """Tokens of own feedback the verifier returns per rollout: feedback_len, or 0 when
    the teacher never shows it (no buffer, no tokenisation)."""
    return self.feedback_len if self.include_feedback else 0


@dataclasses.dataclass(frozen=True)
class LossSettings(_Section):
  """Top-k generalised JSD between student and teacher (MOPD spec §3)."""

  NAME: ClassVar[str] = "loss"
  alpha: float = knob(0.5, _num(0.0, 1.0), "a number in [0, 1]",
                      "0 = forward KL, 1 = reverse KL, else generalised JSD.")
  top_k: int | None = knob(100, _optional(_int(1)),
                           "None (full vocabulary) or a positive integer", kind=int)
  add_tail: bool = knob(True, _bool, "True or False")
  aggregation: str | None = knob(
      None, _optional(_one_of(choices.AGGREGATION_MODES)),
      f"None (the algorithm's default) or one of {choices.AGGREGATION_MODES}",
      "How per-token losses are averaged over the batch (mopd_jax.losses.aggregate). "
      "None: the algorithm's `default_aggregation` (seq-mean-token-mean-all for mopd, "
      "sdpo and opd, as the authors' runs aggregate; token-mean for the policy losses).",
      kind=str)
  temperature: float = knob(
      1.0, _num(0.0, lo_open=True), "a number > 0",
      "Distillation temperature: both sides' logits are divided by it (its own setting, "
      "separate from the sampling temperature).")
  chunk_size: int = knob(32, _int(1), "a positive integer",
                         "Response positions per chunk of the vocabulary projection.")
  full_logit: bool = knob(True, _bool, "True or False")
  rollout_correction_clip: float = knob(2.0, _num(0.0), "a number >= 0 (0 = off)")

  def check(self):
    if not self.full_logit and self.alpha != 1.0:
      raise ConfigError(
          f"Invalid config.loss.alpha = {self.alpha!r} with config.loss.full_logit = False: "
          "the non-full-logit mode is reverse KL only, so alpha must be 1.0.")


@dataclasses.dataclass(frozen=True)
class TeacherSettings(_Section):
  NAME: ClassVar[str] = "teacher"
  mode: str = knob("ema", _one_of(choices.TEACHER_MODES),
                   f"one of {choices.TEACHER_MODES}")
  checkpoint: str | None = knob(None, _optional(_str), "None, 'demo' or a checkpoint path",
                                "External teacher only ('demo': the demo base model's "
                                "larger teacher, built on first use).", kind=str)
  param_dtype: str = knob("bfloat16", _one_of(_DTYPES), "'float32' or 'bfloat16'",
                          "The external teacher's parameters.")
  ema_rate: float = knob(0.05, _num(0.0, 1.0), "a number in [0, 1]",
                         "Mode 'ema' only (ignored by the other modes).")
  trust_region_rate: float = knob(
      0.5, _num(0.0, 1.0), "a number in [0, 1]",
      "Mode 'trust_region' only (ignored by the other modes): the teacher's logits are "
      "(1 - rate) * frozen initial student + rate * current student (stop-gradient), both "
      "reading the teacher prompt. 0 = 'frozen', 1 = the student itself with the context. "
      "Costs one more teacher-length forward of the student per step (no backward).")

  def check(self):
    if self.mode == "external" and not self.checkpoint:
      raise ConfigError("config.teacher.checkpoint is required when config.teacher.mode = "
                        "'external': pass --config.teacher.checkpoint=PATH to a Hugging Face "
                        "checkpoint directory.")

  @property
  def ema(self) -> float:
    """The EMA rate the step applies: 0 unless the mode is 'ema'."""
    return self.ema_rate if self.mode == "ema" else 0.0

  @property
  def trust_region(self) -> float | None:
    """The trust-region rate the step applies: None unless the mode is 'trust_region'."""
    return self.trust_region_rate if self.mode == "trust_region" else None


@dataclasses.dataclass(frozen=True)
class OptimSettings(_Section):
  """AdamW after global-norm clipping; linear warm-up, then constant."""

  NAME: ClassVar[str] = "optim"
  lr: float = knob(1e-5, _num(0.0, lo_open=True), "a number > 0")
  warmup_steps: int = knob(10, _int(0), "a non-negative integer")
  b1: float = knob(0.9, _num(0.0, 1.0, hi_open=True), "a number in [0, 1)")
  b2: float = knob(0.999, _num(0.0, 1.0, hi_open=True), "a number in [0, 1)")
  weight_decay: float = knob(0.01, _num(0.0), "a number >= 0")
  grad_clip: float = knob(1.0, _num(0.0, lo_open=True), "a number > 0")
  micro_batch_rows: int = knob(
      0, _int(0), "a non-negative integer (0 = all rows at once)",
      "Rows per micro-batch of the teacher forward and the student forward/backward; "
      "gradients are accumulated, so the update equals the one-batch update. Must divide "
      "data.batch_size * sampling.num_samples and be divisible by the data x fsdp mesh "
      "size. Sampling always runs as one batch.")
  packed_tokens: int = knob(
      0, _int(0), "a non-negative integer (0 = padded rows)",
      "Padding-free update (mopd_jax.packing): each micro-batch's sequences are packed, "
      "with segment ids, into packed_tokens / (max prompt + max response length) rows of "
      "the student pass (and as many rows of the loss), so no FLOP goes to padding beyond "
      "the budget's slack; loss and gradient equal the padded path's. A multiple of that "
      "row length times the data x fsdp mesh size, at most the micro-batch's padded rows. "
      "A batch that does not fit skips its update and stops the run with the budget it "
      "needed (packing.propose_budgets picks one from observed lengths). Distillation "
      "algorithms only (mopd, sdpo, opd).")
  packed_teacher_tokens: int = knob(
      0, _int(0), "a non-negative integer (0 = as many rows as the student's)",
      "With packed_tokens: the teacher pass's budget, in rows of its padded length "
      "(teacher prompt + max response length), a multiple of it times the data x fsdp "
      "mesh size.")

  def check(self):
    if self.packed_teacher_tokens and not self.packed_tokens:
      raise ConfigError(
          f"Invalid config.optim.packed_teacher_tokens = {self.packed_teacher_tokens} with "
          "config.optim.packed_tokens = 0: the teacher's budget applies to packed rows; set "
          "packed_tokens too, or packed_teacher_tokens to 0.")


@dataclasses.dataclass(frozen=True)
class AlgorithmSettings(_Section):
  """The training objective (MOPD spec §6), a registered algorithm of
  `mopd_jax.algorithms` (one module each); all use the same rollouts.

  mopd: the peers section's context. sdpo: the 1S context (the primary success) plus the
  own feedback of include_feedback; it needs include_another = include_failure = False.
  opd: the teacher reads the plain prompt (no peers); pair it with teacher.mode 'external'
  or 'frozen' and loss.alpha = 1 (reverse KL). grpo, sft, dpo, simpo: policy losses
  without a teacher context (dpo's reference model is the frozen initial student, kept in
  the teacher slot). Policy log-probs are taken at the sampling temperature. The knobs
  below belong to the algorithm their prefix names.
  """

  NAME: ClassVar[str] = "algorithm"
  name: str = knob("mopd", lambda v: isinstance(v, str) and v.isidentifier(),
                   f"a registered algorithm ({', '.join(registry.BUILTIN_MODULES)} or one "
                   "added with mopd_jax.algorithms.register)")
  grpo_clip_low: float = knob(0.2, _num(0.0, 1.0, hi_open=True), "a number in [0, 1)",
                              "Ratio lower clip 1 - grpo_clip_low.")
  grpo_clip_high: float = knob(0.28, _num(0.0), "a number >= 0",
                               "Ratio upper clip 1 + grpo_clip_high.")
  grpo_dual_clip: float | None = knob(
      3.0, _optional(_num(1.0, lo_open=True)), "None or a number > 1",
      "Bound -A * c on the loss of a token with negative advantage A.", kind=float)
  grpo_normalize_std: bool = knob(False, _bool, "True or False",
                                  "Divide advantages by the group's reward std.")
  dpo_beta: float = knob(0.1, _num(0.0, lo_open=True), "a number > 0")
  simpo_beta: float = knob(2.0, _num(0.0, lo_open=True), "a number > 0")
  simpo_gamma: float = knob(1.0, _num(), "a finite number", "Target reward margin.")
  simpo_label_smoothing: float = knob(0.0, _num(0.0, 0.5), "a number in [0, 0.5]")
