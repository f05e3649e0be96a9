"""Per-token divergences, importance weights and token aggregation.

Divergences (per token, between the student distribution S and the teacher
distribution T over the vocabulary, or over a top-k support plus a tail
bucket):

* ``alpha = 0``: forward KL, ``KL(T || S) = sum_v T_v (log T_v - log S_v)``
  (mode covering, the supervised-distillation objective).
* ``alpha = 1``: reverse KL, ``KL(S || T) = sum_v S_v (log S_v - log T_v)``
  (mode seeking, the on-policy distillation objective).
* ``0 < alpha < 1``: generalised Jensen-Shannon divergence with mixture
  ``M = (1 - alpha) S + alpha T``:
  ``(1 - alpha) KL(S || M) + alpha KL(T || M)``; ``alpha = 0.5`` is the
  symmetric JSD.

With ``top_k = k`` both distributions are restricted to the student's k most
likely tokens, either renormalised or completed by a tail bucket holding the
remaining probability mass, so the divergence needs at most k + 1 values per side.
"""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from mopd_jax.choices import AGGREGATION_MODES


_LOG_RATIO_BOUND = 20.0


def _check_alpha(alpha) -> float:
  """Returns ``alpha`` as a float, or raises ValueError if not in [0, 1]."""
  if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
    raise ValueError(f"alpha must be a real number in [0, 1], got {alpha!r}")
  alpha = float(alpha)
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
  return alpha


def _check_top_k(top_k) -> int | None:
  """Returns ``top_k`` as an int (or None), or raises ValueError if not positive."""
  if top_k is None:
    return None
  if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
    raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
  if top_k <= 0:
    raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
  return int(top_k)


def _check_positive(name: str, value) -> float:
  """Returns ``value`` as a float, or raises ValueError if not finite and > 0."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"{name} must be a positive number, got {value!r}")
  value = float(value)
  if not (math.isfinite(value) and value > 0.0):
    raise ValueError(f"{name} must be a positive finite number, got {value!r}")
  return value


def _tail_log_mass(logp: jax.Array, idx: jax.Array) -> jax.Array:
  """Log of the probability mass outside the tokens ``idx``, without cancellation.

  ``logsumexp`` of the log-probabilities outside ``idx`` (the entries at ``idx``
  masked to -inf), which is the logsumexp of the logits outside minus the full
  logsumexp; not ``log(1 - sum_k p_k)``, which in float32 cancels when the top-k
  hold almost all the mass. An all -inf complement gives -inf with finite
  gradients.

  Args:
    logp: float32 [..., V] normalised log-probabilities.
    idx: int [..., k] token ids inside the support, k < V.

  Returns:
    float32 [..., 1].
  """
  outside = jnp.put_along_axis(logp, idx, -jnp.inf, axis=-1, inplace=False)  # [..., V]
  shift = jax.lax.stop_gradient(jnp.max(outside, axis=-1, keepdims=True))  # [..., 1]
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  total = jnp.sum(jnp.exp(outside - shift), axis=-1, keepdims=True)  # [..., 1]
  positive = total > 0.0
  return jnp.where(positive, shift + jnp.log(jnp.where(positive, total, 1.0)), -jnp.inf)


def _kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
  """``KL(p || q) = sum p (log p - log q)`` over the last axis, 0 log 0 = 0.

  Args:
    logp: float32 [..., K] log-probabilities of p.
    logq: float32 [..., K] log-probabilities of q.

  Returns:
    float32 [...].
  """
  p = jnp.exp(logp)
  diff = jnp.where(p > 0.0, logp - logq, 0.0)
  return jnp.sum(p * diff, axis=-1)


def _divergence_from_logprobs(logp_s: jax.Array, logp_t: jax.Array, alpha: float) -> jax.Array:
  """Forward KL / reverse KL / generalised JSD between two distributions.

  Args:
    logp_s: float32 [..., K] student log-probabilities (normalised).
    logp_t: float32 [..., K] teacher log-probabilities (normalised).
    alpha: validated float in [0, 1].

  Returns:
    float32 [...].
  """
  if alpha == 0.0:
    return _kl(logp_t, logp_s)
  if alpha == 1.0:
    return _kl(logp_s, logp_t)
  logp_m = jnp.logaddexp(math.log1p(-alpha) + logp_s, math.log(alpha) + logp_t)
  return (1.0 - alpha) * _kl(logp_s, logp_m) + alpha * _kl(logp_t, logp_m)


def _restrict_top_k(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    logp_s: jax.Array,
    logp_t: jax.Array,
    top_k: int,
    add_tail: bool,
) -> tuple[jax.Array, jax.Array]:
  """Restricts both distributions to the student's top-k tokens.

  Without a tail the k values are renormalised from the gathered logits,
  which equals renormalising the gathered log-probabilities but avoids the
  float32 cancellation of subtracting two large log-normalisers. With a tail,
  the last bucket is the log-mass outside the top-k (``_tail_log_mass``).
  A top_k of V or more selects the whole vocabulary (the tail is empty).

  Args:
    student_logits: float32 [..., V] student logits (selects the support).
    teacher_logits: float32 [..., V] teacher logits.
    logp_s: float32 [..., V] student log-probabilities.
    logp_t: float32 [..., V] teacher log-probabilities.
    top_k: positive int.
    add_tail: append a tail bucket with the remaining mass if True, else
      renormalise over the k selected tokens.

  Returns:
    (student, teacher) log-probabilities, float32 [..., k + 1] with a tail
    bucket or [..., k] without; the full [..., V] when top_k >= V.
  """
  if top_k >= student_logits.shape[-1]:
    return logp_s, logp_t
  _, idx = jax.lax.top_k(student_logits, top_k)  # [..., k]
  if not add_tail:
    top_s = jnp.take_along_axis(student_logits, idx, axis=-1)  # [..., k]
    top_t = jnp.take_along_axis(teacher_logits, idx, axis=-1)  # [..., k]
    return jax.nn.log_softmax(top_s, axis=-1), jax.nn.log_softmax(top_t, axis=-1)

  def with_tail(logp: jax.Array) -> jax.Array:
    top = jnp.take_along_axis(logp, idx, axis=-1)  # [..., k]
    return jnp.concatenate([top, _tail_log_mass(logp, idx)], axis=-1)

  return with_tail(logp_s), with_tail(logp_t)


def _divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    alpha: float,
    top_k: int | None,
    add_tail: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-token divergence on validated arguments, also returning log-probs.

  Args:
    student_logits: float32 [..., V].
    teacher_logits: float32 [..., V].
    alpha: validated float in [0, 1].
    top_k: validated positive int or None.
    add_tail: see ``per_token_divergence``.

  Returns:
    (divergence float32 [...], student log-probs float32 [..., V],
    teacher log-probs float32 [..., V]).
  """
  logp_s = jax.nn.log_softmax(student_logits, axis=-1)  # [..., V]
  logp_t = jax.nn.log_softmax(teacher_logits, axis=-1)  # [..., V]
  if top_k is None:
    dist_s, dist_t = logp_s, logp_t
  else:
    dist_s, dist_t = _restrict_top_k(
        student_logits, teacher_logits, logp_s, logp_t, top_k, add_tail
    )
  return _divergence_from_logprobs(dist_s, dist_t, alpha), logp_s, logp_t


def per_token_divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    alpha: float,
    top_k: int | None,
    add_tail: bool = True,
) -> jax.Array:
  """Unmasked per-position divergence between student and teacher.

  Args:
    student_logits: [..., L, V] student logits, any float dtype (computed in
      float32).
    teacher_logits: [..., L, V] teacher logits, same shape. Gradients are not
      stopped here; stop them in the caller if the teacher is frozen.
    alpha: 0 -> forward KL(T || S); 1 -> reverse KL(S || T); in between ->
      (1 - alpha) KL(S || M) + alpha KL(T || M) with M = (1 - alpha) S + alpha T.
    top_k: None for the full vocabulary, else a positive int: both
      distributions are gathered at the student's top-k token ids (top_k >= V
      selects every token).
    add_tail: with top_k, append a tail bucket holding the log-mass outside
      the top-k to each side (k + 1 buckets), computed as the logsumexp of
      the log-probabilities outside the top-k (no cancellation when the top-k
      hold almost all the mass); if False, renormalise the k gathered
      probabilities.

  Returns:
    float32 [..., L] divergence per position.

  Raises:
    ValueError: if alpha is outside [0, 1], top_k is not None or a positive
      int, or the logits shapes differ.
  """
  alpha = _check_alpha(alpha)
  top_k = _check_top_k(top_k)
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
        "student_logits and teacher_logits must have the same shape, got "
        f"{student_logits.shape} and {teacher_logits.shape}"
    )
  if student_logits.ndim < 1:
    raise ValueError(f"logits need a vocabulary axis, got shape {student_logits.shape}")
  div, _, _ = _divergence(
      student_logits.astype(jnp.float32),
      teacher_logits.astype(jnp.float32),
      alpha,
      top_k,
      bool(add_tail),
  )
  return div


def _clipped_ratio(logp: jax.Array, ref_logp: jax.Array, clip) -> jax.Array:
  """``stop_gradient(min(exp(clamp(logp - ref_logp, -20, 20)), clip))`` in float32."""
  clip = _check_positive("clip", clip)
  log_ratio = logp.astype(jnp.float32) - ref_logp.astype(jnp.float32)
  log_ratio = jnp.clip(log_ratio, -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
  return jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_ratio), clip))


def importance_clip_weights(logp: jax.Array, old_logp: jax.Array, clip: float) -> jax.Array:
  """Truncated importance weights ``min(p / p_old, clip)`` without gradient.

  Args:
    logp: float [N, L] log-probabilities of the sampled tokens under the
      current policy.
    old_logp: float [N, L] log-probabilities under the policy that generated
      the rollouts.
    clip: positive upper bound on the weight.

  Returns:
    float32 [N, L] ``min(exp(clamp(logp - old_logp, -20, 20)), clip)`` under
    stop_gradient.

  Raises:
    ValueError: if clip is not a positive finite number.
  """
  return _clipped_ratio(logp, old_logp, clip)


def rollout_correction_weights(
    trainer_logp: jax.Array, sampler_logp: jax.Array, clip: float = 2.0
) -> jax.Array:
  """Truncated weights correcting the trainer/sampler numerical mismatch.

  Args:
    trainer_logp: float [N, L] log-probabilities of the sampled tokens as
      computed by the trainer.
    sampler_logp: float [N, L] log-probabilities reported by the sampler.
    clip: positive upper bound on the weight.

  Returns:
    float32 [N, L] ``min(exp(clamp(trainer_logp - sampler_logp, -20, 20)), clip)``
    under stop_gradient.

  Raises:
    ValueError: if clip is not a positive finite number.
  """
  return _clipped_ratio(trainer_logp, sampler_logp, clip)


def aggregation_weights(mask: jax.Array, mode: str) -> jax.Array:
  """Per-token weights of an aggregation: ``aggregate(x, mask, mode) = sum(w * x)``.

  Masked-out positions get weight 0, and ``aggregate`` drops them even where
  ``x`` is not finite. The weights depend on the mask only, so a loss split over
  row micro-batches is the sum of each micro-batch's ``sum(w * x)`` with the
  weights of the whole batch: the gradient accumulated over micro-batches equals
  the gradient of one batch.

  Args:
    mask: [N, L] 0/1 mask (bool or numeric).
    mode: one of ``AGGREGATION_MODES`` (see ``aggregate``).

  Returns:
    float32 [N, L] weights w.

  Raises:
    ValueError: on an unknown mode or a mask that is not [N, L].
  """
  if mode not in AGGREGATION_MODES:
    raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {AGGREGATION_MODES}")
  if mask.ndim != 2:
    raise ValueError(f"mask must be [N, L], got shape {mask.shape}")
  weight = mask.astype(jnp.float32)  # [N, L]
  if mode == "token-mean":
    return weight / jnp.maximum(jnp.sum(weight), 1.0)
  seq_count = jnp.sum(weight, axis=-1, keepdims=True)  # [N, 1]
  if mode == "seq-mean-token-mean-all":
    # Every row counts in N, even one without tokens (its weights are all 0).
    return weight / jnp.maximum(seq_count, 1.0) / mask.shape[0]
  has_tokens = seq_count > 0.0  # [N, 1]
  num_seqs = jnp.maximum(jnp.sum(has_tokens.astype(jnp.float32)), 1.0)
  if mode == "seq-mean-token-mean":
    weight = weight / jnp.maximum(seq_count, 1.0)
  return jnp.where(has_tokens, weight, 0.0) / num_seqs


def _weighted_sum(values: jax.Array, weights: jax.Array) -> jax.Array:
  """``sum(values * weights)`` over positions with a non-zero weight, float32."""
  return jnp.sum(jnp.where(weights != 0.0, values.astype(jnp.float32) * weights, 0.0))


def aggregate(per_token: jax.Array, mask: jax.Array, mode: str) -> jax.Array:
  """Reduces a masked per-token loss to a scalar.

  Args:
    per_token: float [N, L] per-token values.
    mask: [N, L] 0/1 mask (bool or numeric); masked-out values never leak,
      even if they are not finite.
    mode: one of ``AGGREGATION_MODES``:
      "token-mean": sum(loss * mask) / max(sum(mask), 1);
      "seq-mean-token-sum": per-sequence masked sum, averaged over sequences
        with at least one token (0 if there are none);
      "seq-mean-token-mean": per-sequence masked mean, averaged over
        sequences with at least one token (0 if there are none);
      "seq-mean-token-mean-all": per-sequence masked mean (denominator
        max(row mask sum, 1)), averaged over all N rows: a row without
        tokens contributes 0 but counts in N. This is the authors' effective
        loss (one sequence per micro-batch, token-mean inside it, each
        micro-batch scaled by 1 / N; MOPD spec section 3).

  Returns:
    float32 scalar.

  Raises:
    ValueError: on an unknown mode or mismatched / non-2D shapes.
  """
  if per_token.ndim != 2 or per_token.shape != mask.shape:
    raise ValueError(
        "per_token and mask must both be [N, L], got " f"{per_token.shape} and {mask.shape}"
    )
  return _weighted_sum(per_token, aggregation_weights(mask, mode))
