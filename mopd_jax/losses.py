"""Distillation losses, importance weights and token aggregation for MOPD.

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

Memory and compute: a full-vocabulary loss over ``[N, L]`` positions would
materialise ``[N, L, V]`` float32 logits for the student and the teacher (plus
their gradients), which dominates memory for large vocabularies.
``chunked_distillation`` scans over position chunks and, when differentiated,
computes each chunk's gradient in the same pass (a custom VJP), so only
``[N, chunk_size, V]`` logits are live at any time and each vocabulary
projection is computed once.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

AGGREGATION_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")

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
        sequences with at least one token (0 if there are none).

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


class Distillation(NamedTuple):
  """Outputs of ``chunked_distillation``; only ``loss`` carries a gradient."""

  loss: jax.Array  # float32 scalar: sum_t token_weights_t * correction_t * per_token_t
  per_token: jax.Array  # float32 [N, L] unweighted divergence (or estimator)
  student_logp: jax.Array  # float32 [N, L] log p_S(targets)
  teacher_logp: jax.Array  # float32 [N, L] log p_T(targets)


def _chunk_terms(s_logits, t_logits, tgt, *, alpha, top_k, add_tail, full_logit):
  """Per-token loss and target log-probs of one chunk of float32 logits [N, C, V]."""
  if full_logit:
    per_token, logp_s, logp_t = _divergence(s_logits, t_logits, alpha, top_k, add_tail)
  else:
    logp_s = jax.nn.log_softmax(s_logits, axis=-1)
    logp_t = jax.nn.log_softmax(t_logits, axis=-1)
  tok_s = jnp.take_along_axis(logp_s, tgt[..., None], axis=-1)[..., 0]  # [N, C]
  tok_t = jnp.take_along_axis(logp_t, tgt[..., None], axis=-1)[..., 0]  # [N, C]
  if not full_logit:
    per_token = jax.lax.stop_gradient(tok_s - tok_t) * tok_s
  return per_token, tok_s, tok_t


def chunked_distillation(
    student_hidden: jax.Array,
    teacher_hidden: jax.Array,
    student_head: jax.Array,
    teacher_head: jax.Array,
    targets: jax.Array,
    *,
    token_weights: jax.Array,
    alpha: float,
    top_k: int | None,
    add_tail: bool = True,
    temperature: float = 1.0,
    chunk_size: int = 128,
    full_logit: bool = True,
    sampler_logp: jax.Array | None = None,
    correction_clip: float = 2.0,
    sampler_temperature: float | None = None,
) -> Distillation:
  """Weighted distillation loss from hidden states, chunked over positions.

  ``loss = sum_t token_weights_t * c_t * per_token_t`` over positions with a
  non-zero weight, where ``c_t = min(exp(clamp(student_logp_t - sampler_logp_t,
  -20, 20)), correction_clip)`` is the rollout correction (1 without
  ``sampler_logp``) and ``per_token_t`` the divergence of ``per_token_divergence``
  (or the sampled-token estimator) of the logits ``hidden @ head / temperature``.
  With ``token_weights = aggregation_weights(mask, mode)`` this is
  ``aggregate(per_token * c, mask, mode)``. Weights and corrections carry no
  gradient; the teacher side is under stop_gradient.

  Logits are computed one chunk of ``chunk_size`` positions at a time inside a
  ``lax.scan``, so ``[N, L, V]`` logits never exist. The vocabulary matmuls take
  their operands in the dtype of the hidden states (the model's compute dtype:
  bfloat16 under bfloat16 compute, even with float32 heads) and accumulate in
  float32; softmax and divergence run in float32.

  Gradient (``jax.custom_vjp``): when differentiated, each chunk computes its
  loss and, in the same pass, the gradient of the weighted loss with respect to
  its student logits, then with respect to the student hidden states and head.
  Cost: 4 vocabulary-sized matmuls of ``2 N L D V`` flops each (student and
  teacher logits, d/dhidden, d/dhead), none in the backward pass, which only
  scales the saved ``d loss / d hidden`` (``[N, L, D]`` in the hidden dtype) and
  ``d loss / d head`` (``[D, V]``, accumulated across chunks in float32) by the
  incoming scalar cotangent. (Rematerialising each chunk in the backward pass
  would cost 6: both projections again, then the two gradient matmuls.)
  Without differentiation only the 2 logit projections run. Live memory per
  chunk: a few float32 ``[N, chunk_size, V]`` arrays.

  Args:
    student_hidden: [N, L, D] student final hidden states, any float dtype.
    teacher_hidden: [N, L, D_T] teacher final hidden states, any float dtype.
    student_head: [D, V] student unembedding matrix.
    teacher_head: [D_T, V] teacher unembedding matrix (same V).
    targets: int [N, L] sampled tokens predicted at each position.
    token_weights: float [N, L] weight of each position in ``loss``, e.g.
      ``aggregation_weights(mask, mode)``; zero drops a position.
    alpha: divergence parameter, see ``per_token_divergence``.
    top_k: None or positive int, see ``per_token_divergence``.
    add_tail: see ``per_token_divergence``.
    temperature: positive divisor applied to both sides' logits.
    chunk_size: positions per chunk; L is padded to a multiple of it (a
      chunk_size above L gives a single chunk of L).
    full_logit: if True the per-token loss is ``per_token_divergence`` of the
      chunk logits. If False (reverse KL only, alpha must be 1) it is the
      sampled-token estimator ``stop_gradient(lp_S(y) - lp_T(y)) * lp_S(y)``.
    sampler_logp: float [N, L] log-probabilities of the targets reported by
      the sampler; None disables the rollout correction.
    correction_clip: positive upper bound of the rollout correction.
    sampler_temperature: the temperature `sampler_logp` was computed at; the
      correction compares it with the student's log-prob at that temperature
      (one more log-softmax per chunk when it differs from `temperature`).
      None: the same as `temperature`.

  Returns:
    ``Distillation(loss, per_token, student_logp, teacher_logp)``; ``loss`` is a
    float32 scalar differentiable with respect to the student hidden states and
    head, the rest are float32 [N, L] without gradient.

  Raises:
    ValueError: on bad alpha / top_k / temperature / chunk_size /
      correction_clip, alpha != 1 with full_logit=False, or inconsistent shapes
      (including a vocabulary size mismatch between the two heads).
  """
  alpha = _check_alpha(alpha)
  top_k = _check_top_k(top_k)
  add_tail = bool(add_tail)
  full_logit = bool(full_logit)
  temperature = _check_positive("temperature", temperature)
  correction_clip = _check_positive("correction_clip", correction_clip)
  if (
      isinstance(chunk_size, bool)
      or not isinstance(chunk_size, numbers.Integral)
      or chunk_size <= 0
  ):
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  if not full_logit and alpha != 1.0:
    raise ValueError(
        f"full_logit=False implements reverse KL only and needs alpha=1, got alpha={alpha!r}"
    )
  if student_hidden.ndim != 3 or teacher_hidden.ndim != 3:
    raise ValueError(
        "student_hidden and teacher_hidden must be [N, L, D], got "
        f"{student_hidden.shape} and {teacher_hidden.shape}"
    )
  if student_head.ndim != 2 or teacher_head.ndim != 2:
    raise ValueError(
        "student_head and teacher_head must be [D, V], got "
        f"{student_head.shape} and {teacher_head.shape}"
    )
  if student_head.shape[1] != teacher_head.shape[1]:
    raise ValueError(
        f"vocabulary sizes differ: student_head has V={student_head.shape[1]}, "
        f"teacher_head has V={teacher_head.shape[1]}"
    )
  if student_hidden.shape[2] != student_head.shape[0]:
    raise ValueError(
        f"student_hidden has D={student_hidden.shape[2]} but student_head has "
        f"D={student_head.shape[0]}"
    )
  if teacher_hidden.shape[2] != teacher_head.shape[0]:
    raise ValueError(
        f"teacher_hidden has D={teacher_hidden.shape[2]} but teacher_head has "
        f"D={teacher_head.shape[0]}"
    )
  n, length, _ = student_hidden.shape
  per_position = {"teacher_hidden": teacher_hidden.shape[:2], "targets": targets.shape,
                  "token_weights": token_weights.shape}
  if sampler_logp is not None:
    per_position["sampler_logp"] = sampler_logp.shape
  for name, shape in per_position.items():
    if tuple(shape) != (n, length):
      raise ValueError(
          f"{name} must be [N, L] = {(n, length)} like student_hidden, got {tuple(shape)}"
      )
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
  if length == 0:
    raise ValueError(f"sequence length must be positive, got shape {student_hidden.shape}")

  chunk = min(int(chunk_size), length)
  num_chunks = -(-length // chunk)
  pad = num_chunks * chunk - length

  def to_chunks(x: jax.Array) -> jax.Array:
    """[N, L, ...] -> [num_chunks, N, chunk, ...], zero-padding L (weight 0 there)."""
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((n, num_chunks, chunk) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  def from_chunks(x: jax.Array) -> jax.Array:
    """[num_chunks, N, chunk, ...] -> [N, L, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape((n, num_chunks * chunk) + x.shape[3:])[:, :length]

  terms = functools.partial(_chunk_terms, alpha=alpha, top_k=top_k, add_tail=add_tail,
                            full_logit=full_logit)
  use_correction = sampler_logp is not None
  if sampler_temperature is None:
    sampler_temperature = temperature
  sampler_temperature = _check_positive("sampler_temperature", sampler_temperature)
  s_dtype = student_hidden.dtype

  def logits_of(hidden: jax.Array, head: jax.Array) -> jax.Array:
    """[N, C, D] x [D, V] (same dtype) -> float32 [N, C, V] / temperature."""
    logits = jnp.einsum("ncd,dv->ncv", hidden, head, preferred_element_type=jnp.float32)
    return logits / temperature

  def weighted_loss(s_logits, t_logits, tgt, weights, samp):
    """(weighted chunk loss, (per_token, tok_s, tok_t)) of float32 logits [N, C, V]."""
    per_token, tok_s, tok_t = terms(s_logits, t_logits, tgt)
    values = per_token
    if use_correction:
      tok_c = tok_s
      if sampler_temperature != temperature:
        rescaled = jax.nn.log_softmax(s_logits * (temperature / sampler_temperature), -1)
        tok_c = jnp.take_along_axis(rescaled, tgt[..., None], axis=-1)[..., 0]
      values = values * _clipped_ratio(tok_c, samp, correction_clip)
    return _weighted_sum(values, weights), (per_token, tok_s, tok_t)

  def forward(s_hidden, s_head, t_hidden, t_head, tgt, weights, samp):
    """Loss and per-token outputs, 2 vocabulary matmuls."""
    s_head, t_head = s_head.astype(s_dtype), t_head.astype(t_hidden.dtype)

    def body(total, xs):
      s_h, t_h, tgt_c, w_c, samp_c = xs
      value, outs = weighted_loss(logits_of(s_h, s_head), logits_of(t_h, t_head), tgt_c,
                                  w_c, samp_c)
      return total + value, outs

    xs = tuple(to_chunks(x) for x in (s_hidden, t_hidden, tgt, weights, samp))
    total, outs = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return (total,) + tuple(from_chunks(x) for x in outs)

  def forward_with_grad(s_hidden, s_head, t_hidden, t_head, tgt, weights, samp):
    """Loss, per-token outputs and d loss / d (s_hidden, s_head), 4 vocabulary matmuls."""
    s_head_c, t_head = s_head.astype(s_dtype), t_head.astype(t_hidden.dtype)

    def body(carry, xs):
      total, d_head = carry  # float32 scalar, float32 [D, V]
      s_h, t_h, tgt_c, w_c, samp_c = xs
      t_logits = logits_of(t_h, t_head)  # [N, C, V]
      loss_of = lambda s_logits: weighted_loss(s_logits, t_logits, tgt_c, w_c, samp_c)
      value, pullback, outs = jax.vjp(loss_of, logits_of(s_h, s_head_c), has_aux=True)
      (d_logits,) = pullback(jnp.ones((), jnp.float32))  # float32 [N, C, V]
      d_logits = (d_logits / temperature).astype(s_dtype)
      d_hidden = jnp.einsum("ncv,dv->ncd", d_logits, s_head_c,
                            preferred_element_type=jnp.float32)  # [N, C, D]
      d_head = d_head + jnp.einsum("ncd,ncv->dv", s_h, d_logits,
                                   preferred_element_type=jnp.float32)  # [D, V]
      return (total + value, d_head), (d_hidden.astype(s_dtype),) + outs

    xs = tuple(to_chunks(x) for x in (s_hidden, t_hidden, tgt, weights, samp))
    init = (jnp.zeros((), jnp.float32), jnp.zeros(s_head.shape, jnp.float32))
    (total, d_head), outs = jax.lax.scan(body, init, xs)
    d_hidden, per_token, tok_s, tok_t = (from_chunks(x) for x in outs)
    return (total, per_token, tok_s, tok_t), (d_hidden, d_head)

  @jax.custom_vjp
  def distill(s_hidden, s_head, t_hidden, t_head, tgt, weights, samp):
    return forward(s_hidden, s_head, t_hidden, t_head, tgt, weights, samp)

  def distill_fwd(s_hidden, s_head, t_hidden, t_head, tgt, weights, samp):
    outputs, (d_hidden, d_head) = forward_with_grad(s_hidden, s_head, t_hidden, t_head,
                                                    tgt, weights, samp)
    return outputs, (d_hidden, d_head.astype(s_head.dtype))

  def distill_bwd(residuals, cotangents):
    # The per-token outputs leave under stop_gradient: only the loss' cotangent counts.
    d_hidden, d_head = residuals
    g = cotangents[0]
    return ((g * d_hidden).astype(d_hidden.dtype), (g * d_head).astype(d_head.dtype),
            None, None, None, None, None)

  distill.defvjp(distill_fwd, distill_bwd)

  sg = jax.lax.stop_gradient
  weights = sg(token_weights.astype(jnp.float32))
  samp = (sg(sampler_logp.astype(jnp.float32)) if use_correction
          else jnp.zeros((n, length), jnp.float32))
  loss, per_token, tok_s, tok_t = distill(student_hidden, student_head, sg(teacher_hidden),
                                          sg(teacher_head), targets, weights, samp)
  return Distillation(loss=loss, per_token=sg(per_token), student_logp=sg(tok_s),
                      teacher_logp=sg(tok_t))


# ----------------------------------------------------------------------------
# Baselines at the same rollout budget (MOPD spec, section 6).
# ----------------------------------------------------------------------------


def grpo_advantages(rewards: jax.Array, *, normalize_std: bool = False) -> jax.Array:
  """Group-relative advantages of GRPO.

  Args:
    rewards: float [B, G], the rewards of the G rollouts of each of B prompts.
    normalize_std: also divide by the group's sample standard deviation (ddof 1) plus
      1e-6. Off by default, as in the paper's GRPO baseline.

  Returns:
    float32 [B, G] ``r - mean(group r)`` (divided by ``std + 1e-6`` if normalize_std).
    A group of one rollout has advantage 0.

  Raises:
    ValueError: if rewards is not [B, G].
  """
  if rewards.ndim != 2:
    raise ValueError(f"rewards must be [B, G], got shape {rewards.shape}")
  rewards = rewards.astype(jnp.float32)
  centred = rewards - jnp.mean(rewards, axis=-1, keepdims=True)  # [B, G]
  if not normalize_std or rewards.shape[-1] < 2:
    return centred
  std = jnp.std(rewards, axis=-1, keepdims=True, ddof=1)  # [B, 1]
  return centred / (std + 1e-6)


def grpo_per_token(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
) -> jax.Array:
  """Clipped PPO surrogate of GRPO per token, with the dual clip for negative advantages.

  With ``r = exp(logp - old_logp)`` (log-ratio clamped to [-20, 20]):
  ``l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))`` and, where A < 0,
  ``l = min(l, -A dual_clip)``. The dual clip bounds the loss of a token whose ratio
  has grown far beyond the trust region while its advantage is negative.

  Args:
    logp: float [N, L] log-probabilities of the sampled tokens under the current policy.
    old_logp: float [N, L] the same under the policy that sampled them (no gradient).
    advantages: float [N], one advantage per sequence.
    clip_low: ratio lower clip is ``1 - clip_low``; in [0, 1).
    clip_high: ratio upper clip is ``1 + clip_high``; >= 0.
    dual_clip: constant c > 1 of the dual clip, or None to disable it.

  Returns:
    float32 [N, L] per-token loss, unmasked.

  Raises:
    ValueError: on bad clip values or shapes.
  """
  if isinstance(clip_low, bool) or not isinstance(clip_low, numbers.Real) or not (
      0.0 <= clip_low < 1.0
  ):
    raise ValueError(f"clip_low must be in [0, 1), got {clip_low!r}")
  if isinstance(clip_high, bool) or not isinstance(clip_high, numbers.Real) or not (
      0.0 <= clip_high < math.inf
  ):
    raise ValueError(f"clip_high must be a finite number >= 0, got {clip_high!r}")
  if dual_clip is not None and (
      isinstance(dual_clip, bool)
      or not isinstance(dual_clip, numbers.Real)
      or not 1.0 < dual_clip < math.inf
  ):
    raise ValueError(f"dual_clip must be None or a finite number > 1, got {dual_clip!r}")
  if logp.ndim != 2 or logp.shape != old_logp.shape:
    raise ValueError(
        f"logp and old_logp must both be [N, L], got {logp.shape} and {old_logp.shape}"
    )
  if advantages.shape != logp.shape[:1]:
    raise ValueError(f"advantages must be [N] = {logp.shape[:1]}, got {advantages.shape}")
  log_ratio = logp.astype(jnp.float32) - jax.lax.stop_gradient(old_logp.astype(jnp.float32))
  ratio = jnp.exp(jnp.clip(log_ratio, -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND))  # [N, L]
  adv = jax.lax.stop_gradient(advantages.astype(jnp.float32))[:, None]  # [N, 1]
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  loss = jnp.maximum(unclipped, clipped)
  if dual_clip is not None:
    loss = jnp.where(adv < 0.0, jnp.minimum(loss, -adv * float(dual_clip)), loss)
  return loss


def _check_same_shape(**arrays) -> None:
  """Raises ValueError unless every array is 1-D with the same shape."""
  shapes = {name: a.shape for name, a in arrays.items()}
  first = next(iter(shapes.values()))
  if len(first) != 1 or any(s != first for s in shapes.values()):
    raise ValueError(f"expected 1-D arrays of one shape [P], got {shapes}")


def dpo_loss(
    chosen_logp: jax.Array,
    rejected_logp: jax.Array,
    ref_chosen_logp: jax.Array,
    ref_rejected_logp: jax.Array,
    *,
    beta: float = 0.1,
) -> jax.Array:
  """DPO loss per pair: ``-log sigmoid(beta ((c - rc) - (r - rr)))``.

  Args:
    chosen_logp: float [P] summed response log-probability of the preferred rollout
      under the policy.
    rejected_logp: float [P] the same for the dispreferred rollout.
    ref_chosen_logp: float [P] the preferred rollout under the reference model.
    ref_rejected_logp: float [P] the dispreferred rollout under the reference model.
    beta: positive inverse temperature.

  Returns:
    float32 [P], one loss per pair (mask invalid pairs in the caller).

  Raises:
    ValueError: on a non-positive beta or mismatched shapes.
  """
  beta = _check_positive("beta", beta)
  _check_same_shape(
      chosen_logp=chosen_logp,
      rejected_logp=rejected_logp,
      ref_chosen_logp=ref_chosen_logp,
      ref_rejected_logp=ref_rejected_logp,
  )
  f32 = lambda x: x.astype(jnp.float32)
  margin = (f32(chosen_logp) - f32(ref_chosen_logp)) - (
      f32(rejected_logp) - f32(ref_rejected_logp)
  )
  return -jax.nn.log_sigmoid(beta * margin)


def simpo_loss(
    chosen_logp_sum: jax.Array,
    rejected_logp_sum: jax.Array,
    chosen_len: jax.Array,
    rejected_len: jax.Array,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> jax.Array:
  """SimPO loss per pair, reference-free and length-normalised.

  With ``m = beta (c / |c| - r / |r|) - gamma`` the loss is
  ``-(1 - eps) log sigmoid(m) - eps log sigmoid(-m)``.

  Args:
    chosen_logp_sum: float [P] summed response log-probability of the preferred rollout.
    rejected_logp_sum: float [P] the same for the dispreferred rollout.
    chosen_len: [P] response lengths in tokens of the preferred rollouts (a length
      below 1 is taken as 1).
    rejected_len: [P] the same for the dispreferred rollouts.
    beta: positive reward scale.
    gamma: target reward margin (any finite number).
    label_smoothing: eps in [0, 0.5].

  Returns:
    float32 [P], one loss per pair.

  Raises:
    ValueError: on bad beta / gamma / label_smoothing or mismatched shapes.
  """
  beta = _check_positive("beta", beta)
  if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not math.isfinite(gamma):
    raise ValueError(f"gamma must be a finite number, got {gamma!r}")
  if (
      isinstance(label_smoothing, bool)
      or not isinstance(label_smoothing, numbers.Real)
      or not 0.0 <= label_smoothing <= 0.5
  ):
    raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing!r}")
  _check_same_shape(
      chosen_logp_sum=chosen_logp_sum,
      rejected_logp_sum=rejected_logp_sum,
      chosen_len=chosen_len,
      rejected_len=rejected_len,
  )

  def per_token(total, length):
    return total.astype(jnp.float32) / jnp.maximum(length.astype(jnp.float32), 1.0)

  chosen = per_token(chosen_logp_sum, chosen_len)
  rejected = per_token(rejected_logp_sum, rejected_len)
  margin = beta * (chosen - rejected) - float(gamma)
  eps = float(label_smoothing)
  return -(1.0 - eps) * jax.nn.log_sigmoid(margin) - eps * jax.nn.log_sigmoid(-margin)


def verified_sft_per_token(
    logp: jax.Array,
    response_mask: jax.Array,
    rewards: jax.Array,
    *,
    threshold: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
  """Length-normalised NLL of verified rollouts (rejection-sampling SFT).

  A rollout is *verified* when its reward is >= threshold and it has at least one
  response token. Its per-token loss is ``-logp / (number of response tokens)``, so a
  row sums to its mean token NLL; other rows are 0. The batch loss is
  ``sum(loss) / max(sum(verified), 1)``: the mean over verified rollouts of their
  length-normalised NLL.

  Args:
    logp: float [N, L] log-probabilities of the response tokens under the policy.
    response_mask: [N, L] 0/1 mask of response tokens (bool or numeric).
    rewards: float [N] verifier rewards.
    threshold: rewards >= threshold count as verified.

  Returns:
    loss: float32 [N, L] per-token loss (0 outside verified response tokens).
    verified: bool [N].

  Raises:
    ValueError: on mismatched shapes or a non-finite threshold.
  """
  if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(
      threshold
  ):
    raise ValueError(f"threshold must be a finite number, got {threshold!r}")
  if logp.ndim != 2 or logp.shape != response_mask.shape:
    raise ValueError(
        f"logp and response_mask must both be [N, L], got {logp.shape} and {response_mask.shape}"
    )
  if rewards.shape != logp.shape[:1]:
    raise ValueError(f"rewards must be [N] = {logp.shape[:1]}, got {rewards.shape}")
  weight = (response_mask != 0).astype(jnp.float32)  # [N, L]
  length = jnp.sum(weight, axis=-1)  # [N]
  verified = (rewards >= threshold) & (length > 0.0)  # [N]
  scale = jnp.where(verified, 1.0 / jnp.maximum(length, 1.0), 0.0)[:, None]  # [N, 1]
  loss = jnp.where(weight * scale > 0.0, -logp.astype(jnp.float32) * weight * scale, 0.0)
  return loss, verified


class GroupPairs(NamedTuple):
  """Preference pairs (a, b) with r_a > r_b inside each group, padded to a fixed shape.

  P = G (G - 1) / 2 slots per group (every unordered pair once); the valid pairs come
  first, in the order (a, b) of the lower index then the higher index of the pair.

  Attributes:
    chosen: int32 [B, P] flat row b*G + a of the higher-reward rollout, -1 on padding.
    rejected: int32 [B, P] flat row b*G + b of the lower-reward rollout, -1 on padding.
    valid: bool [B, P].
    num_pairs: int32 [B] valid pairs per group.
    num_empty_groups: int32 scalar, groups without a single pair (all rewards equal).
  """

  chosen: jax.Array
  rejected: jax.Array
  valid: jax.Array
  num_pairs: jax.Array
  num_empty_groups: jax.Array


def group_pairs(rewards: jax.Array) -> GroupPairs:
  """On-policy preference pairs within each group: all (a, b) with r_a > r_b.

  Ties form no pair, so a group whose rollouts all have the same reward contributes
  nothing and is counted in ``num_empty_groups``.

  Args:
    rewards: float [B, G].

  Returns:
    GroupPairs of static shape [B, G (G - 1) / 2].

  Raises:
    ValueError: if rewards is not [B, G].
  """
  if rewards.ndim != 2:
    raise ValueError(f"rewards must be [B, G], got shape {rewards.shape}")
  batch, group = rewards.shape
  low, high = (jnp.asarray(x, jnp.int32) for x in _upper_triangle(group))  # [P] each
  r_low, r_high = rewards[:, low], rewards[:, high]  # [B, P]
  valid = r_low != r_high
  low_wins = r_low > r_high
  chosen = jnp.where(low_wins, low, high)  # [B, P]
  rejected = jnp.where(low_wins, high, low)
  # Stable compaction: valid pairs first, keeping their order.
  order = jnp.argsort(~valid, axis=-1, stable=True)  # [B, P]
  valid = jnp.take_along_axis(valid, order, axis=-1)
  offset = (jnp.arange(batch, dtype=jnp.int32) * group)[:, None]

  def rows(index):
    index = jnp.take_along_axis(index, order, axis=-1) + offset
    return jnp.where(valid, index, -1).astype(jnp.int32)

  num_pairs = jnp.sum(valid, axis=-1).astype(jnp.int32)
  return GroupPairs(
      chosen=rows(chosen),
      rejected=rows(rejected),
      valid=valid,
      num_pairs=num_pairs,
      num_empty_groups=jnp.sum(num_pairs == 0).astype(jnp.int32),
  )


def _upper_triangle(group: int) -> tuple[list[int], list[int]]:
  """Index lists (low, high) of every pair low < high of range(group), row-major."""
  pairs = [(a, b) for a in range(group) for b in range(a + 1, group)]
  return [a for a, _ in pairs], [b for _, b in pairs]


def chunked_token_logp(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 128,
) -> jax.Array:
  """Log-probabilities of `targets` from hidden states, chunked over positions.

  The policy-side counterpart of ``chunked_distillation`` for the baselines: logits
  ``hidden @ head / temperature`` exist only one chunk of positions at a time, and each
  chunk is rematerialised in the backward pass.

  Args:
    hidden: [N, L, D] final hidden states, any float dtype.
    head: [D, V] unembedding matrix.
    targets: int [N, L] the token predicted at each position.
    temperature: positive divisor of the logits.
    chunk_size: positions per chunk (L is padded to a multiple of it).

  Returns:
    float32 [N, L] log p(targets), differentiable in hidden and head.

  Raises:
    ValueError: on a bad temperature / chunk_size or inconsistent shapes.
  """
  temperature = _check_positive("temperature", temperature)
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or (
      chunk_size <= 0
  ):
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  if hidden.ndim != 3 or head.ndim != 2 or hidden.shape[2] != head.shape[0]:
    raise ValueError(
        f"hidden must be [N, L, D] and head [D, V], got {hidden.shape} and {head.shape}"
    )
  n, length, _ = hidden.shape
  if targets.shape != (n, length) or length == 0:
    raise ValueError(f"targets must be [N, L] = {(n, length)} with L > 0, got {targets.shape}")
  chunk = min(int(chunk_size), length)
  num_chunks = -(-length // chunk)
  pad = num_chunks * chunk - length

  def to_chunks(x: jax.Array) -> jax.Array:
    """[N, L, ...] -> [num_chunks, N, chunk, ...], zero-padding L."""
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((n, num_chunks, chunk) + x.shape[2:]), 1, 0)

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk_logp(h, tgt, w):
    logits = jnp.einsum("ncd,dv->ncv", h, w, preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)  # [N, C, V]
    return jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]  # [N, C]

  def body(carry, xs):
    return carry, chunk_logp(xs[0], xs[1], head)

  _, out = jax.lax.scan(body, None, (to_chunks(hidden), to_chunks(targets)))
  return jnp.moveaxis(out, 0, 1).reshape(n, num_chunks * chunk)[:, :length]
