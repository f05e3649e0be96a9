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

Memory: a full-vocabulary loss over ``[N, L]`` positions would materialise
``[N, L, V]`` float32 logits for the student and the teacher (plus their
gradients), which dominates memory for large vocabularies. ``chunked_distillation``
instead scans over position chunks and rematerialises each chunk's logits in the
backward pass, so only ``[N, chunk_size, V]`` logits are live at any time.
"""

from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp

AGGREGATION_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")

_TAIL_LSE_MAX = -1e-7
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


def _log1mexp(x: jax.Array) -> jax.Array:
  """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides of ``-log 2``.

  Both branches are finite (with finite gradients) for ``x <= -1e-7``, so the
  ``where`` does not leak NaNs into the gradient.
  """
  return jnp.where(
      x > -math.log(2.0),
      jnp.log(-jnp.expm1(x)),
      jnp.log1p(-jnp.exp(x)),
  )


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
  float32 cancellation of subtracting two large log-normalisers.

  Args:
    student_logits: float32 [..., V] student logits (selects the support).
    teacher_logits: float32 [..., V] teacher logits.
    logp_s: float32 [..., V] student log-probabilities.
    logp_t: float32 [..., V] teacher log-probabilities.
    top_k: positive int; values >= V select the whole vocabulary.
    add_tail: append a tail bucket with the remaining mass if True, else
      renormalise over the k selected tokens.

  Returns:
    (student, teacher) log-probabilities, float32 [..., k + 1] with a tail
    bucket or [..., k] without, where k = min(top_k, V).
  """
  k = min(top_k, student_logits.shape[-1])
  _, idx = jax.lax.top_k(student_logits, k)  # [..., k]
  if not add_tail:
    top_s = jnp.take_along_axis(student_logits, idx, axis=-1)  # [..., k]
    top_t = jnp.take_along_axis(teacher_logits, idx, axis=-1)  # [..., k]
    return jax.nn.log_softmax(top_s, axis=-1), jax.nn.log_softmax(top_t, axis=-1)
  top_s = jnp.take_along_axis(logp_s, idx, axis=-1)  # [..., k]
  top_t = jnp.take_along_axis(logp_t, idx, axis=-1)  # [..., k]

  def with_tail(top: jax.Array) -> jax.Array:
    mass = jnp.minimum(jax.nn.logsumexp(top, axis=-1, keepdims=True), _TAIL_LSE_MAX)
    return jnp.concatenate([top, _log1mexp(mass)], axis=-1)

  return with_tail(top_s), with_tail(top_t)


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
    add_tail: with top_k, append a tail bucket log(1 - sum_k p_k) to each side
      (k + 1 buckets); if False, renormalise the k gathered probabilities.

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
  if mode not in AGGREGATION_MODES:
    raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {AGGREGATION_MODES}")
  if per_token.ndim != 2 or per_token.shape != mask.shape:
    raise ValueError(
        "per_token and mask must both be [N, L], got " f"{per_token.shape} and {mask.shape}"
    )
  weight = mask.astype(jnp.float32)  # [N, L]
  values = jnp.where(weight != 0.0, per_token.astype(jnp.float32) * weight, 0.0)  # [N, L]
  if mode == "token-mean":
    return jnp.sum(values) / jnp.maximum(jnp.sum(weight), 1.0)
  seq_sum = jnp.sum(values, axis=-1)  # [N]
  seq_count = jnp.sum(weight, axis=-1)  # [N]
  if mode == "seq-mean-token-mean":
    seq_sum = seq_sum / jnp.maximum(seq_count, 1.0)
  has_tokens = seq_count > 0.0  # [N]
  num_seqs = jnp.sum(has_tokens.astype(jnp.float32))
  return jnp.sum(jnp.where(has_tokens, seq_sum, 0.0)) / jnp.maximum(num_seqs, 1.0)


def chunked_distillation(
    student_hidden: jax.Array,
    teacher_hidden: jax.Array,
    student_head: jax.Array,
    teacher_head: jax.Array,
    targets: jax.Array,
    *,
    alpha: float,
    top_k: int | None,
    add_tail: bool = True,
    temperature: float = 1.0,
    chunk_size: int = 128,
    full_logit: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-token distillation loss from hidden states, chunked over positions.

  Logits ``hidden @ head / temperature`` are computed (float32 accumulation)
  one chunk of ``chunk_size`` positions at a time inside a ``lax.scan`` whose
  body is rematerialised in the backward pass, so ``[N, L, V]`` logits never
  exist. The teacher side is under stop_gradient.

  Args:
    student_hidden: [N, L, D] student final hidden states, any float dtype.
    teacher_hidden: [N, L, D_T] teacher final hidden states, any float dtype.
    student_head: [D, V] student unembedding matrix.
    teacher_head: [D_T, V] teacher unembedding matrix (same V).
    targets: int [N, L] sampled tokens predicted at each position.
    alpha: divergence parameter, see ``per_token_divergence``.
    top_k: None or positive int, see ``per_token_divergence``.
    add_tail: see ``per_token_divergence``.
    temperature: positive divisor applied to both sides' logits.
    chunk_size: positions per chunk; L is padded to a multiple of it (a
      chunk_size above L gives a single chunk of L).
    full_logit: if True the loss is ``per_token_divergence`` of the chunk
      logits. If False (reverse KL only, alpha must be 1) the loss is the
      sampled-token estimator ``stop_gradient(lp_S(y) - lp_T(y)) * lp_S(y)``.

  Returns:
    per_token_loss: float32 [N, L], unmasked.
    student_logp: float32 [N, L] log p_S(targets), differentiable.
    teacher_logp: float32 [N, L] log p_T(targets), no gradient.

  Raises:
    ValueError: on bad alpha / top_k / temperature / chunk_size, alpha != 1
      with full_logit=False, or inconsistent shapes (including a vocabulary
      size mismatch between the two heads).
  """
  alpha = _check_alpha(alpha)
  top_k = _check_top_k(top_k)
  add_tail = bool(add_tail)
  temperature = _check_positive("temperature", temperature)
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
  if teacher_hidden.shape[:2] != (n, length) or targets.shape != (n, length):
    raise ValueError(
        "student_hidden, teacher_hidden and targets must share [N, L], got "
        f"{student_hidden.shape[:2]}, {teacher_hidden.shape[:2]} and {targets.shape}"
    )
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
  if length == 0:
    raise ValueError(f"sequence length must be positive, got shape {student_hidden.shape}")

  teacher_hidden = jax.lax.stop_gradient(teacher_hidden)
  teacher_head = jax.lax.stop_gradient(teacher_head)

  chunk = min(int(chunk_size), length)
  num_chunks = -(-length // chunk)
  pad = num_chunks * chunk - length

  def to_chunks(x: jax.Array) -> jax.Array:
    """[N, L, ...] -> [num_chunks, N, chunk, ...], zero-padding L."""
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape((n, num_chunks, chunk) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  def logits_of(hidden: jax.Array, head: jax.Array) -> jax.Array:
    """[N, C, D] x [D, V] -> float32 [N, C, V] / temperature."""
    logits = jnp.einsum("ncd,dv->ncv", hidden, head, preferred_element_type=jnp.float32)
    return logits / temperature

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk_loss(s_hidden, t_hidden, tgt, s_head, t_head):
    """One chunk: [N, C, D], [N, C, D_T], int [N, C] -> three float32 [N, C]."""
    s_logits = logits_of(s_hidden, s_head)  # [N, C, V]
    t_logits = logits_of(t_hidden, t_head)  # [N, C, V]
    if full_logit:
      loss, logp_s, logp_t = _divergence(s_logits, t_logits, alpha, top_k, add_tail)
    else:
      logp_s = jax.nn.log_softmax(s_logits, axis=-1)
      logp_t = jax.nn.log_softmax(t_logits, axis=-1)
    tok_s = jnp.take_along_axis(logp_s, tgt[..., None], axis=-1)[..., 0]  # [N, C]
    tok_t = jnp.take_along_axis(logp_t, tgt[..., None], axis=-1)[..., 0]  # [N, C]
    if not full_logit:
      loss = jax.lax.stop_gradient(tok_s - tok_t) * tok_s
    return loss, tok_s, tok_t

  def body(carry, xs):
    s_hidden, t_hidden, tgt = xs
    return carry, chunk_loss(s_hidden, t_hidden, tgt, student_head, teacher_head)

  xs = (to_chunks(student_hidden), to_chunks(teacher_hidden), to_chunks(targets))
  _, outs = jax.lax.scan(body, None, xs)  # 3 x [num_chunks, N, chunk]

  def from_chunks(x: jax.Array) -> jax.Array:
    """[num_chunks, N, chunk] -> [N, L]."""
    return jnp.moveaxis(x, 0, 1).reshape(n, num_chunks * chunk)[:, :length]

  loss, student_logp, teacher_logp = (from_chunks(x) for x in outs)
  return loss, student_logp, jax.lax.stop_gradient(teacher_logp)


def aggregation_weights(mask: jax.Array, mode: str) -> jax.Array:
  """Per-token weights w [N, L] with ``aggregate(x, mask, mode) == sum(x * w)``.

  The weights depend on the mask only, so a loss split over row micro-batches is the
  sum of each micro-batch's ``sum(x * w)`` with the weights of the whole batch: the
  gradient accumulated over micro-batches equals the gradient of one batch.

  Args:
    mask: [N, L] 0/1 mask (bool or numeric).
    mode: one of ``AGGREGATION_MODES`` (see ``aggregate``).

  Returns:
    float32 [N, L], zero wherever the mask is zero.
  """
  if mode not in AGGREGATION_MODES:
    raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {AGGREGATION_MODES}")
  if mask.ndim != 2:
    raise ValueError(f"mask must be [N, L], got shape {mask.shape}")
  weight = mask.astype(jnp.float32)  # [N, L]
  if mode == "token-mean":
    return weight / jnp.maximum(jnp.sum(weight), 1.0)
  seq_count = jnp.sum(weight, axis=-1, keepdims=True)  # [N, 1]
  num_seqs = jnp.maximum(jnp.sum((seq_count > 0.0).astype(jnp.float32)), 1.0)
  if mode == "seq-mean-token-mean":
    weight = weight / jnp.maximum(seq_count, 1.0)
  return weight / num_seqs
