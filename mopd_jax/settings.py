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

The dataclasses are hashable, so the step takes them as static configuration. Every
error is a `ConfigError` that names the key, the value and what is allowed. Allowed
values come from `mopd_jax.choices`; the checks that span sections (those of the
algorithm included: `Algorithm.check`) run once, when `Settings` is built. Importing
this module imports no JAX.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, ClassVar

import ml_collections

from mopd_jax import choices
from mopd_jax.algorithms import registry
from mopd_jax.choices import ConfigError

__all__ = ["ConfigError", "Settings", "base_config", "from_config", "section", "to_dict"]


# ------------------------------------------------------------------ Checks.

def _int(lo=None):
  return lambda v: (isinstance(v, int) and not isinstance(v, bool)
                    and (lo is None or v >= lo))


def _num(lo=None, hi=None, lo_open=False, hi_open=False):
  def ok(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      return False
    if lo is not None and (v <= lo if lo_open else v < lo):
      return False
    return hi is None or (v < hi if hi_open else v <= hi)
  return ok


def _bool(v):
  return isinstance(v, bool)


def _one_of(options):
  return lambda v: v in options


def _optional(ok):
  return lambda v: v is None or ok(v)


def _str(v):
  return isinstance(v, str)


_DTYPES = ("float32", "bfloat16")


def knob(default, ok, allowed: str, doc: str = "", *, kind: type | None = None):
  """A setting: default, validity check, and the phrase naming allowed values.

  kind: the value type of a knob whose default is None, so that the command line can
  still set it (`--config.data.cache_dir=PATH`).
  """
  return dataclasses.field(default=default, metadata={
      "ok": ok, "allowed": allowed, "doc": doc, "kind": kind})


@dataclasses.dataclass(frozen=True)
class _Section:
  """Base: validates every knob, then the cross-knob rules of `check`."""

  NAME: ClassVar[str] = ""

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, list):  # ConfigDict tuples may come back as lists
        value = tuple(value)
        object.__setattr__(self, f.name, value)
      if not f.metadata["ok"](value):
        raise ConfigError(f"Invalid {self.key(f.name)} = {value!r}: must be "
                          f"{f.metadata['allowed']}.")
    self.check()

  def check(self):
    """Rules that involve several knobs of the section."""

  @classmethod
  def key(cls, name: str) -> str:
    return f"config.{cls.NAME}.{name}" if cls.NAME else f"config.{name}"

  @classmethod
  def from_section(cls, values: dict[str, Any]):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f"Unknown key(s) {[cls.key(k) for k in unknown]}; "
                        f"{cls.key('')[:-1]} takes {sorted(known)}.")
    return cls(**values)


# ------------------------------------------------------------------ Sections.

@dataclasses.dataclass(frozen=True)
class RunSettings(_Section):
  """Top-level keys: seed, length of the run, checkpoint / eval / log cadence."""

  seed: int = knob(42, _int(0), "a non-negative integer")
  total_steps: int = knob(60, _int(0), "a non-negative integer")
  checkpoint_every: int = knob(20, _int(0), "a non-negative integer (0 = only on exit)")
  keep_checkpoints: int = knob(3, _int(1), "a positive integer")
  eval_every: int = knob(30, _int(0), "a non-negative integer (0 = before and after only)")
  log_every: int = knob(1, _int(1), "a positive integer")


@dataclasses.dataclass(frozen=True)
class ModelSettings(_Section):
  """The student: 'demo' (the built-in base model) or a Hugging Face checkpoint."""

  NAME: ClassVar[str] = "model"
  checkpoint: str | None = knob("demo", _optional(lambda v: isinstance(v, str) and v),
                                "'demo' or a checkpoint path", kind=str)
  preset: str = knob("", _str, "'' or a preset name of mopd_jax.models.presets",
                     "If set, the checkpoint must have this preset's shapes.")
  cache_dir: str | None = knob(None, _optional(_str), "None or a directory", kind=str)
  dtype: str = knob("float32", _one_of(_DTYPES), "'float32' or 'bfloat16'",
                    "Compute dtype.")
  param_dtype: str = knob("float32", _one_of(_DTYPES), "'float32' or 'bfloat16'")
  remat_policy: str = knob(
      "full", _one_of(choices.REMAT_POLICIES), f"one of {list(choices.REMAT_POLICIES)}",
      "jax.checkpoint policy of each layer in the backward pass ('none' = no remat).")
  attention: str = knob("auto", _one_of(choices.ATTENTION_KINDS),
                        f"one of {list(choices.ATTENTION_KINDS)}",
                        "Attention implementation (auto: splash on TPU, cudnn on GPU where "
                        "it applies, else blockwise; splash_interpret: the splash kernel in "
                        "the Pallas interpreter, for tests).")
  matmul_precision: str = knob(
      "default", _one_of(choices.MATMUL_PRECISIONS),
      f"one of {list(choices.MATMUL_PRECISIONS)}",
      "Precision of float32 matmuls ('highest' = no TF32 / bfloat16 passes on GPU / TPU).")

  def model_config(self, loaded, *, external_teacher: bool = False):
    """The `ModelConfig` a run computes with: `loaded`'s shapes with this section's
    numerics. An external teacher keeps the parameter dtype it was loaded in
    (config.teacher.param_dtype) and no remat: it is never differentiated."""
    return dataclasses.replace(
        loaded, dtype=self.dtype, attention=self.attention,
        matmul_precision=self.matmul_precision,
        param_dtype=loaded.param_dtype if external_teacher else self.param_dtype,
        remat_policy="none" if external_teacher else self.remat_policy)

  def check(self):
    if self.checkpoint is None:
      raise ConfigError("config.model.checkpoint is required for this preset: pass "
                        "--config.model.checkpoint=PATH to a Hugging Face checkpoint "
                        "directory.")


def _json_object(v):
  if not isinstance(v, str):
    return False
  try:
    return isinstance(json.loads(v), dict)
  except ValueError:
    return False


DATA_TASKS = ("demo_code",) + tuple(choices.TASK_DOMAINS)
OVERLONG_MODES = ("filter", "truncate")


@dataclasses.dataclass(frozen=True)
class DataSettings(_Section):
  """Prompts: the demo task, or a real-data task read from the datasets' native files.

  A real-data task trains on `source` at `path` (with reader `options`) and evaluates on
  `eval_source` at `eval_path` (each defaulting to the training one) with `eval_options`;
  see mopd_jax.data.sources for the kinds and their options.
  """

  NAME: ClassVar[str] = "data"
  task: str = knob("demo_code", _one_of(DATA_TASKS), f"one of {DATA_TASKS}",
                   "'demo_code', or the domain of a real-data task (seqio task mopd_<task>).")
  source: str = knob("", _one_of(("",) + choices.SOURCE_KINDS),
                   f"'' or one of {choices.SOURCE_KINDS}",
                     "Source kind of the training problems ('' for demo_code).")
  path: str | None = knob(None, _optional(_str), "None or a file, directory or wheel path",
                          "The training problems' file, directory or wheel.", kind=str)
  options: str = knob("{}", _json_object, "a JSON object of reader options",
                      "e.g. '{\"split\": \"train\"}' (see the source's module).")
  eval_source: str = knob("", _one_of(("",) + choices.SOURCE_KINDS),
                          f"'' (the training source) or one of {choices.SOURCE_KINDS}")
  eval_path: str | None = knob(None, _optional(_str), "None (the training path) or a path",
                               kind=str)
  eval_options: str = knob("{}", _json_object, "a JSON object of reader options")
  cache_dir: str | None = knob(None, _optional(_str), "None or a directory",
                               "The tokenised prompts (default with the demo model: its "
                               "cache directory's data/; required with a checkpoint).",
                               kind=str)
  batch_size: int = knob(16, _int(1), "a positive integer",
                         "Prompts per step; rows = batch_size * sampling.num_samples.")
  max_prompt_len: int = knob(48, _int(2), "an integer >= 2")
  overlong: str = knob("filter", _one_of(OVERLONG_MODES), f"one of {OVERLONG_MODES}",
                       "Prompts longer than max_prompt_len are left out ('filter') or lose "
                       "the middle of their text ('truncate'); either way they are counted.")

  def check(self):
    given = [n for n in ("source", "path", "eval_source", "eval_path") if getattr(self, n)]
    if self.task == "demo_code":
      if given:
        raise ConfigError(f"Invalid {self.key(given[0])} = {getattr(self, given[0])!r} with "
                          "config.data.task = 'demo_code': the demo task has no source; "
                          f"set config.data.task to one of {DATA_TASKS[1:]}.")
      return
    for name in ("source", "path"):
      if not getattr(self, name):
        raise ConfigError(f"{self.key(name)} is required with config.data.task = "
                          f"{self.task!r}: pass --{self.key(name)}=...")


@dataclasses.dataclass(frozen=True)
class SamplingSettings(_Section):
  """Student rollouts during training (MOPD spec: temperature 1, top_p 1, top_k off)."""

  NAME: ClassVar[str] = "sampling"
  num_samples: int = knob(8, _int(1), "a positive integer", "G rollouts per prompt.")
  max_response_len: int = knob(4096, _int(1), "a positive integer")
  temperature: float = knob(1.0, _num(0.0, lo_open=True), "a number > 0")
  top_k: int = knob(0, _int(0), "a non-negative integer (0 = off)")
  top_p: float = knob(1.0, _num(0.0, 1.0, lo_open=True), "a number in (0, 1]")
  decode_layers: str = knob(
      "scan", _one_of(choices.DECODE_LAYERS), f"one of {choices.DECODE_LAYERS}",
      "How a decode step runs the layers: under a scan over the stacked weights, or one "
      "after another from weights split once per sampling call (one more copy of them "
      "while sampling; no per-step slice of each layer's weights). Faster depends on the "
      "backend: benchmarks.sampler_vs_hf --decode-layers=scan,unrolled compares them.")
  decode_layout: str = knob(
      "tensor", _one_of(choices.DECODE_LAYOUTS), f"one of {choices.DECODE_LAYOUTS}",
      "Layout of the weights while sampling (training and evaluation). 'tensor': resharded "
      "once per sampling call into a copy split over the mesh's 'tensor' axis only (in the "
      "compute dtype), so a decode step reads local weights instead of gathering the "
      "fsdp-split ones at every generated token; the copy costs parameters x compute "
      "bytes / tensor size per device (the memory plan's 'decode weights'). 'train': decode "
      "in the training layout, for a model whose copy does not fit.")


@dataclasses.dataclass(frozen=True)
class VerifierSettings(_Section):
  NAME: ClassVar[str] = "verifier"
  time_limit_s: float = knob(1.0, _num(0.0, lo_open=True), "a number > 0",
                             "Per test case, on top of one second of start-up.")
  max_workers: int | None = knob(None, _optional(_int(1)),
                                 "None (one per core) or a positive integer", kind=int)
  batch_deadline_s: float | None = knob(
      120.0, _optional(_num(0.0, lo_open=True)), "None or a number > 0",
      "After this many seconds per verification call, unfinished responses score 0 "
      "(counted as timeouts). None: no batch deadline beyond the per-response limits.",
      kind=float)
  success_threshold: float = knob(1.0, _num(0.0, 1.0), "a number in [0, 1]")
  memory_bytes: int = knob(
      1 << 30, _int(16 << 20), "an integer number of bytes >= 16777216 (16 MiB)",
      "Memory of one code response: all the processes it starts together (a cgroup, where "
      "the host has one) and each process alone (its address space).")


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
  checkpoint: str | None = knob(None, _optional(_str), "None or a checkpoint path",
                                "External teacher only.", kind=str)
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


@dataclasses.dataclass(frozen=True)
class EvalSettings(_Section):
  """Held-out evaluation (MOPD spec §5: n=8 samples, temperature 0.6, top_p 0.95)."""

  NAME: ClassVar[str] = "eval"
  num_prompts: int = knob(64, _int(1), "a positive integer")
  num_samples: int = knob(8, _int(1), "a positive integer")
  temperature: float = knob(0.6, _num(0.0), "a number >= 0 (0 = greedy)")
  top_p: float = knob(0.95, _num(0.0, 1.0, lo_open=True), "a number in (0, 1]")
  top_k: int = knob(0, _int(0), "a non-negative integer (0 = off)")


def _mesh_shape(v):
  return (isinstance(v, tuple) and len(v) == 3
          and all(_int()(s) and (s > 0 or s == -1) for s in v)
          and sum(s == -1 for s in v) <= 1)


@dataclasses.dataclass(frozen=True)
class MeshSettings(_Section):
  """('data', 'fsdp', 'tensor') mesh: `shape` within a slice (ICI), `dcn_shape` across
  slices or hosts (DCN); the global mesh is their elementwise product."""

  NAME: ClassVar[str] = "mesh"
  shape: tuple[int, ...] = knob(
      (-1, 1, 1), _mesh_shape,
      "three sizes for ('data', 'fsdp', 'tensor'), each positive or -1 (at most one -1: "
      "the remaining devices)")
  dcn_shape: tuple[int, ...] = knob(
      (1, 1, 1), lambda v: _mesh_shape(v) and -1 not in v,
      "three positive sizes for ('data', 'fsdp', 'tensor') across slices (TPU) or "
      "processes (GPU, CPU)",
      "(1, 1, 1): one slice. Otherwise the mesh is built with "
      "mesh_utils.create_hybrid_device_mesh and `shape` is the shape within one slice.")
  compile_for: str = knob(
      "", _str, "'' or a TPU topology as JAX names it, e.g. 'v5p:4x4x4'",
      "Compile-only run (mopd_jax.aot): compile the step for this topology (slices: the "
      "product of dcn_shape) from abstract shapes, print the memory plan against the "
      "chip's HBM, and exit 0 if it fits, 1 if not. Needs libtpu (the `tpu` extra).")


DISTRIBUTED_MODES = ("auto", "off", "explicit")


def _address(v):
  host, _, port = v.rpartition(":")
  return bool(host) and port.isdigit() and 0 < int(port) < 65536


@dataclasses.dataclass(frozen=True)
class DistributedSettings(_Section):
  """Multi-process start-up (`mopd_jax.distributed`).

  'auto' initialises jax.distributed when the environment describes a multi-process job
  (TPU pod, SLURM, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID as a
  Kubernetes Job or `launch/local.sh` sets them) and stays single-process otherwise;
  'explicit' uses the three keys below; 'off' never initialises.
  """

  NAME: ClassVar[str] = "distributed"
  mode: str = knob("auto", _one_of(DISTRIBUTED_MODES), f"one of {DISTRIBUTED_MODES}")
  coordinator_address: str | None = knob(
      None, _optional(lambda v: isinstance(v, str) and _address(v)),
      "None or 'host:port' (port 1-65535)", "Process 0 serves here ('explicit' only).",
      kind=str)
  num_processes: int | None = knob(None, _optional(_int(1)),
                                   "None or a positive integer", kind=int)
  process_id: int | None = knob(None, _optional(_int(0)),
                                "None or a non-negative integer", kind=int)
  initialization_timeout_s: int = knob(
      300, _int(1), "a positive integer",
      "Seconds to wait for the coordinator and for every process to join.")
  heartbeat_timeout_s: int = knob(
      100, _int(1), "a positive integer",
      "Seconds without a heartbeat after which the other processes stop.")

  def check(self):
    explicit = {"coordinator_address": self.coordinator_address,
                "num_processes": self.num_processes, "process_id": self.process_id}
    if self.mode == "explicit":
      missing = [self.key(k) for k, v in explicit.items() if v is None]
      if missing:
        raise ConfigError(f"config.distributed.mode = 'explicit' needs {missing}.")
      if self.process_id >= self.num_processes:
        raise ConfigError(
            f"Invalid config.distributed.process_id = {self.process_id}: must be below "
            f"config.distributed.num_processes = {self.num_processes}.")
    else:
      given = [self.key(k) for k, v in explicit.items() if v is not None]
      if given:
        raise ConfigError(f"{given} apply only with config.distributed.mode = 'explicit' "
                          f"(got mode {self.mode!r}).")


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
