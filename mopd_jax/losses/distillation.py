"""The chunked distillation loss from hidden states, with a custom VJP.

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
import numbers
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from mopd_jax.losses.divergence import (_check_alpha, _check_positive, _check_top_k,
                                        _clipped_ratio, _divergence, _weighted_sum)


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


def _teacher_terms(teacher_hidden, teacher_head, teacher_weights):
  """(hidden tuple, head tuple, float weight tuple) of one or several teacher terms."""
  several = isinstance(teacher_hidden, (tuple, list))
  if several != isinstance(teacher_head, (tuple, list)):
    raise ValueError("teacher_hidden and teacher_head must both be arrays or both tuples, "
                     f"got {type(teacher_hidden).__name__} and {type(teacher_head).__name__}")
  if not several:
    if teacher_weights is not None:
      raise ValueError("teacher_weights needs tuples of teacher_hidden and teacher_head, "
                       f"got teacher_weights={teacher_weights!r} with single arrays")
    return (teacher_hidden,), (teacher_head,), (1.0,)
  hidden, head = tuple(teacher_hidden), tuple(teacher_head)
  weights = (1.0,) * len(hidden) if teacher_weights is None else tuple(teacher_weights)
  if not hidden or len(head) != len(hidden) or len(weights) != len(hidden):
    raise ValueError(
        f"teacher terms must be non-empty and of one count: got {len(hidden)} hidden, "
        f"{len(head)} heads and {len(weights)} teacher_weights")
  for w in weights:
    if isinstance(w, bool) or not isinstance(w, numbers.Real):
      raise ValueError(f"teacher_weights must be Python numbers, got {weights!r}")
  return hidden, head, tuple(float(w) for w in weights)


def chunked_distillation(
    student_hidden: jax.Array,
    teacher_hidden: jax.Array | Sequence[jax.Array],
    student_head: jax.Array,
    teacher_head: jax.Array | Sequence[jax.Array],
    targets: jax.Array,
    *,
    token_weights: jax.Array,
    teacher_weights: Sequence[float] | None = None,
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

  The teacher may be a weighted sum of several models' logits (the trust-region
  teacher, ``lerp(reference, student, rate)``): pass tuples ``teacher_hidden =
  (h_1, ..., h_m)``, ``teacher_head = (W_1, ..., W_m)`` and ``teacher_weights =
  (w_1, ..., w_m)``; the teacher's logits are then ``sum_i w_i h_i @ W_i`` (before
  the temperature), one more vocabulary matmul per term and chunk, and
  ``[N, L, V]`` logits still never exist.

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
  Without differentiation only the 2 logit projections run. Each extra teacher
  term adds one logit projection to either count. Live memory per
  chunk: a few float32 ``[N, chunk_size, V]`` arrays.

  Args:
    student_hidden: [N, L, D] student final hidden states, any float dtype.
    teacher_hidden: [N, L, D_T] teacher final hidden states, any float dtype,
      or a tuple of such arrays (one per teacher term, each with its own D_T).
    student_head: [D, V] student unembedding matrix.
    teacher_head: [D_T, V] teacher unembedding matrix (same V), or a tuple
      matching ``teacher_hidden``.
    targets: int [N, L] sampled tokens predicted at each position.
    token_weights: float [N, L] weight of each position in ``loss``, e.g.
      ``aggregation_weights(mask, mode)``; zero drops a position.
    teacher_weights: with tuples of teacher terms, one Python float per term,
      the weight of its logits in the teacher's; None = all 1 (must be None
      for a single array).
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
      correction_clip, alpha != 1 with full_logit=False, inconsistent shapes
      (including a vocabulary size mismatch between the heads) or teacher terms
      and weights of different counts.
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
  teacher_hidden, teacher_head, teacher_weights = _teacher_terms(
      teacher_hidden, teacher_head, teacher_weights)
  if student_hidden.ndim != 3:
    raise ValueError(f"student_hidden must be [N, L, D], got {student_hidden.shape}")
  if student_head.ndim != 2:
    raise ValueError(f"student_head must be [D, V], got {student_head.shape}")
  if student_hidden.shape[2] != student_head.shape[0]:
    raise ValueError(
        f"student_hidden has D={student_hidden.shape[2]} but student_head has "
        f"D={student_head.shape[0]}"
    )
  n, length, _ = student_hidden.shape
  per_position = {"targets": targets.shape, "token_weights": token_weights.shape}
  for i, (t_hidden, t_head) in enumerate(zip(teacher_hidden, teacher_head)):
    name = "teacher_hidden" + (f"[{i}]" if len(teacher_hidden) > 1 else "")
    head_name = "teacher_head" + (f"[{i}]" if len(teacher_head) > 1 else "")
    if t_hidden.ndim != 3:
      raise ValueError(f"{name} must be [N, L, D], got {t_hidden.shape}")
    if t_head.ndim != 2:
      raise ValueError(f"{head_name} must be [D, V], got {t_head.shape}")
    if student_head.shape[1] != t_head.shape[1]:
      raise ValueError(
          f"vocabulary sizes differ: student_head has V={student_head.shape[1]}, "
          f"{head_name} has V={t_head.shape[1]}"
      )
    if t_hidden.shape[2] != t_head.shape[0]:
      raise ValueError(
          f"{name} has D={t_hidden.shape[2]} but {head_name} has D={t_head.shape[0]}"
      )
    per_position[name] = t_hidden.shape[:2]
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

  def teacher_logits_of(t_hs, t_heads):
    """float32 [N, C, V]: sum_i w_i t_hs[i] @ t_heads[i] / temperature."""
    terms = [w * logits_of(h, head) for h, head, w in zip(t_hs, t_heads, teacher_weights)]
    return functools.reduce(jnp.add, terms)

  def cast_heads(t_hidden, t_head):
    return tuple(head.astype(h.dtype) for h, head in zip(t_hidden, t_head))

  def forward(s_hidden, s_head, t_hidden, t_head, tgt, weights, samp):
    """Loss and per-token outputs, 1 + (teacher terms) vocabulary matmuls."""
    s_head, t_head = s_head.astype(s_dtype), cast_heads(t_hidden, t_head)

    def body(total, xs):
      s_h, t_h, tgt_c, w_c, samp_c = xs
      value, outs = weighted_loss(logits_of(s_h, s_head), teacher_logits_of(t_h, t_head),
                                  tgt_c, w_c, samp_c)
      return total + value, outs

    xs = tuple(jax.tree.map(to_chunks, x) for x in (s_hidden, t_hidden, tgt, weights, samp))
    total, outs = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return (total,) + tuple(from_chunks(x) for x in outs)

  def forward_with_grad(s_hidden, s_head, t_hidden, t_head, tgt, weights, samp):
    """Loss, per-token outputs and d loss / d (s_hidden, s_head), 3 + (teacher terms)
    vocabulary matmuls."""
    s_head_c, t_head = s_head.astype(s_dtype), cast_heads(t_hidden, t_head)

    def body(carry, xs):
      total, d_head = carry  # float32 scalar, float32 [D, V]
      s_h, t_h, tgt_c, w_c, samp_c = xs
      t_logits = teacher_logits_of(t_h, t_head)  # [N, C, V]
      loss_of = lambda s_logits: weighted_loss(s_logits, t_logits, tgt_c, w_c, samp_c)
      value, pullback, outs = jax.vjp(loss_of, logits_of(s_h, s_head_c), has_aux=True)
      (d_logits,) = pullback(jnp.ones((), jnp.float32))  # float32 [N, C, V]
      d_logits = (d_logits / temperature).astype(s_dtype)
      d_hidden = jnp.einsum("ncv,dv->ncd", d_logits, s_head_c,
                            preferred_element_type=jnp.float32)  # [N, C, D]
      d_head = d_head + jnp.einsum("ncd,ncv->dv", s_h, d_logits,
                                   preferred_element_type=jnp.float32)  # [D, V]
      return (total + value, d_head), (d_hidden.astype(s_dtype),) + outs

    xs = tuple(jax.tree.map(to_chunks, x) for x in (s_hidden, t_hidden, tgt, weights, samp))
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
