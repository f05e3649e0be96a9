"""Start-up validation of a run config: every error names the key, the value and what
is allowed, before anything is built or compiled."""

from __future__ import annotations

import math

from mopd_jax import losses, peer_context, teacher

_REQUIRED_TOP_LEVEL = ("seed", "total_steps", "checkpoint_every", "eval_every")


class ConfigError(ValueError):
  pass


def _get(config, key):
  node = config
  for part in key.split("."):
    if part not in node:
      raise ConfigError(f"Config key {key!r} is missing.")
    node = node[part]
  return node


def _check(config, key, ok, allowed: str):
  value = _get(config, key)
  if not ok(value):
    raise ConfigError(f"Invalid config.{key} = {value!r}: must be {allowed}.")


def _int(lo=None):
  return lambda v: (isinstance(v, int) and not isinstance(v, bool)
                    and (lo is None or v >= lo))


def _num(lo=None, hi=None, lo_open=False):
  def ok(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      return False
    if lo is not None and (v <= lo if lo_open else v < lo):
      return False
    return hi is None or v <= hi
  return ok


def _one_of(options):
  return lambda v: v in options


def validate(config):
  """Raises ConfigError (a ValueError) on the first invalid setting."""
  for key in _REQUIRED_TOP_LEVEL:
    _get(config, key)
  _check(config, "seed", _int(0), "a non-negative integer")
  _check(config, "total_steps", _int(0), "a non-negative integer")
  _check(config, "checkpoint_every", _int(0), "a non-negative integer (0 = only on exit)")
  _check(config, "eval_every", _int(0), "a non-negative integer (0 = before and after only)")
  _check(config, "log_every", _int(1), "a positive integer")
  _check(config, "keep_checkpoints", _int(1), "a positive integer")
  _check(config, "model.dtype", _one_of(("float32", "bfloat16")), "'float32' or 'bfloat16'")
  _check(config, "model.param_dtype", _one_of(("float32", "bfloat16")),
         "'float32' or 'bfloat16'")
  if _get(config, "model.checkpoint") is None:
    raise ConfigError("config.model.checkpoint is required for this preset: pass "
                      "--config.model.checkpoint=PATH to a Hugging Face checkpoint directory.")
  _check(config, "model.checkpoint", lambda v: isinstance(v, str) and v,
         "'demo' or a checkpoint path")
  _check(config, "data.task", _one_of(("demo_code",)), "one of ('demo_code',)")
  _check(config, "data.batch_size", _int(1), "a positive integer")
  _check(config, "data.max_prompt_len", _int(2), "an integer >= 2")
  _check(config, "rollout.num_samples", _int(1), "a positive integer")
  _check(config, "rollout.max_response_len", _int(1), "a positive integer")
  _check(config, "rollout.temperature", _num(0.0, lo_open=True), "a number > 0")
  _check(config, "rollout.top_k", _int(0), "a non-negative integer (0 = off)")
  _check(config, "rollout.top_p", _num(0.0, 1.0, lo_open=True), "a number in (0, 1]")
  _check(config, "verifier.time_limit_s", _num(0.0, lo_open=True), "a number > 0")
  _check(config, "verifier.batch_deadline_s", lambda v: v is None or _num(0.0, lo_open=True)(v),
         "None or a number > 0")
  _check(config, "verifier.success_threshold", _num(0.0, 1.0), "a number in [0, 1]")
  _check(config, "peers.failure_condition", _one_of(peer_context.FAILURE_CONDITIONS),
         f"one of {peer_context.FAILURE_CONDITIONS}")
  for key in ("include_primary", "include_another", "include_failure",
              "exclude_self_success", "include_feedback", "feedback_only_without_solution"):
    _check(config, f"peers.{key}", lambda v: isinstance(v, bool), "True or False")
  _check(config, "peers.peer_cap", _int(1), "a positive integer")
  _check(config, "peers.feedback_len", _int(1), "a positive integer")
  _check(config, "loss.alpha", _num(0.0, 1.0), "a number in [0, 1]")
  _check(config, "loss.top_k", lambda v: v is None or _int(1)(v),
         "None (full vocabulary) or a positive integer")
  _check(config, "loss.aggregation", _one_of(losses.AGGREGATION_MODES),
         f"one of {losses.AGGREGATION_MODES}")
  _check(config, "loss.chunk_size", _int(1), "a positive integer")
  _check(config, "loss.rollout_correction_clip", _num(0.0), "a number >= 0 (0 = off)")
  if not config.loss.full_logit and config.loss.alpha != 1.0:
    raise ConfigError(
        f"Invalid config.loss.alpha = {config.loss.alpha!r} with config.loss.full_logit "
        "= False: the non-full-logit mode is reverse KL only, so alpha must be 1.0.")
  _check(config, "teacher.mode", _one_of(teacher.TEACHER_MODES),
         f"one of {teacher.TEACHER_MODES}")
  _check(config, "teacher.ema_rate", _num(0.0, 1.0), "a number in [0, 1]")
  _check(config, "teacher.param_dtype", _one_of(("float32", "bfloat16")),
         "'float32' or 'bfloat16'")
  if config.teacher.mode == "external" and not config.teacher.checkpoint:
    raise ConfigError("config.teacher.checkpoint is required when config.teacher.mode = "
                      "'external': pass --config.teacher.checkpoint=PATH to a Hugging Face "
                      "checkpoint directory.")
  _check(config, "optim.lr", _num(0.0, lo_open=True), "a number > 0")
  _check(config, "optim.warmup_steps", _int(0), "a non-negative integer")
  _check(config, "optim.b1", _num(0.0, 1.0), "a number in [0, 1)")
  _check(config, "optim.b2", _num(0.0, 1.0), "a number in [0, 1)")
  _check(config, "optim.weight_decay", _num(0.0), "a number >= 0")
  _check(config, "optim.grad_clip", _num(0.0, lo_open=True), "a number > 0")
  _check(config, "eval.num_prompts", _int(1), "a positive integer")
  _check(config, "eval.num_samples", _int(1), "a positive integer")
  _check(config, "eval.temperature", _num(0.0), "a number >= 0 (0 = greedy)")
  _check(config, "eval.top_p", _num(0.0, 1.0, lo_open=True), "a number in (0, 1]")
  _check(config, "eval.top_k", _int(0), "a non-negative integer (0 = off)")
  _check(config, "mesh.shape",
         lambda v: len(tuple(v)) == 3 and all(_int()(s) and (s > 0 or s == -1) for s in v),
         "three sizes for ('data', 'fsdp', 'tensor'), each positive or -1")
