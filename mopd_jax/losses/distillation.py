"""The chunked distillation loss from hidden states, with a custom VJP.

Memory and compute: a full-vocabulary loss over ``[N, L]`` positions would materialise
``[N, L, V]`` float32 logits for the student and the teacher (plus their gradients).
``chunked_distillation`` scans over position chunks and, when differentiated, computes
each chunk's gradient in the same pass (a custom VJP), so only ``[N, chunk_size, V]``
logits are live at any time and each vocabulary projection is computed once.

The vocabulary matmuls take their operands in the dtype of the hidden states (the
model's compute dtype: bfloat16 under bfloat16 compute, even with float32 heads)
and accumulate in float32; softmax and divergence run in float32.

Gradient (``jax.custom_vjp``): when differentiated, each chunk computes its loss
and, in the same pass, the gradient of the weighted loss with respect to its
student logits, then with respect to the student hidden states and head. Cost: 4
vocabulary-sized matmuls of ``2 N L D V`` flops each (student and teacher logits,
d/dhidden, d/dhead), none in the backward pass, which only scales the saved
``d loss / d hidden`` (``[N, L, D]`` in the hidden dtype) and ``d loss / d head``
(``[D, V]``, accumulated across chunks in float32) by the incoming scalar
cotangent. (Rematerialising each chunk in the backward pass would cost 6: both
projections again, then the two gradient matmuls.) Without differentiation only
the 2 logit projections run. Each extra teacher term adds one logit projection to
either count. Live memory per chunk: a few float32 ``[N, chunk_size, V]`` arrays.

The static settings are one frozen, hashable ``DistillationConfig``, checked once when
built and passed to the module's ``custom_vjp`` as a non-differentiable argument.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class DistillationConfig:
  """The static settings of ``chunked_distillation``, normalised and checked once.

  Hashable, so that it is the custom VJP's non-differentiable argument and a jit
  static argument; equal settings give equal configs (numbers are stored as float /
  int, and ``sampler_temperature=None`` as ``temperature``).

  Attributes:
    alpha: divergence parameter in [0, 1], see ``per_token_divergence``.
    top_k: None or positive int, see ``per_token_divergence``.
    add_tail: see ``per_token_divergence``.
    temperature: positive divisor applied to both sides' logits.
    chunk_size: positions per chunk; L is padded to a multiple of it (a chunk_size
      above L gives a single chunk of L).
    full_logit: if True the per-token loss is ``per_token_divergence`` of the chunk
      logits. If False (reverse KL only, alpha must be 1) it is the sampled-token
      estimator ``stop_gradient(lp_S(y) - lp_T(y)) * lp_S(y)``.
    correction_clip: positive upper bound of the rollout correction.
    sampler_temperature: the temperature the sampler's log-probs were computed at;
      the correction compares them with the student's log-prob at that temperature
      (one more log-softmax per chunk when it differs from ``temperature``). None:
      the same as ``temperature``.
    teacher_weights: with several teacher terms, one Python number per term, the
      weight of its logits in the teacher's; None = all 1.

  Raises:
    ValueError: naming the offending value, on bad alpha / top_k / temperature /
      chunk_size / correction_clip / sampler_temperature / teacher_weights, or
      alpha != 1 with full_logit=False.
  """

  alpha: float
  top_k: int | None
  add_tail: bool = True
  temperature: float = 1.0
  chunk_size: int = 128
  full_logit: bool = True
  correction_clip: float = 2.0
  sampler_temperature: float | None = None
  teacher_weights: tuple[float, ...] | None = None

  def __post_init__(self):
    temperature = _check_positive("temperature", self.temperature)
    sampler_t = temperature if self.sampler_temperature is None else self.sampler_temperature
    normalised = dict(
        alpha=_check_alpha(self.alpha), top_k=_check_top_k(self.top_k),
        add_tail=bool(self.add_tail), temperature=temperature,
        chunk_size=_check_chunk_size(self.chunk_size), full_logit=bool(self.full_logit),
        correction_clip=_check_positive("correction_clip", self.correction_clip),
        sampler_temperature=_check_positive("sampler_temperature", sampler_t),
        teacher_weights=_check_teacher_weights(self.teacher_weights))
    for name, value in normalised.items():
      object.__setattr__(self, name, value)
    if not self.full_logit and self.alpha != 1.0:
      raise ValueError("full_logit=False implements reverse KL only and needs alpha=1, "
                       f"got alpha={self.alpha!r}")


def _check_chunk_size(chunk_size) -> int:
  """Returns ``chunk_size`` as an int, or raises ValueError if not a positive int."""
  if (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
      or chunk_size <= 0):
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  return int(chunk_size)


def _check_teacher_weights(weights) -> tuple[float, ...] | None:
  """Returns ``weights`` as a tuple of floats (or None), or raises ValueError."""
  if weights is None:
    return None
  weights = tuple(weights)
  for w in weights:
    if isinstance(w, bool) or not isinstance(w, numbers.Real):
      raise ValueError(f"teacher_weights must be Python numbers, got {weights!r}")
  return tuple(float(w) for w in weights)


# ------------------------------------------------------------------ Call-time checks.

def _teacher_terms(teacher_hidden, teacher_head, teacher_weights):
  """(hidden tuple, head tuple) of one or several teacher terms, as many as weights."""
  several = isinstance(teacher_hidden, (tuple, list))
  if several != isinstance(teacher_head, (tuple, list)):
    raise ValueError("teacher_hidden and teacher_head must both be arrays or both tuples, "
                     f"got {type(teacher_hidden).__name__} and {type(teacher_head).__name__}")
  if not several:
    if teacher_weights is not None:
      raise ValueError("teacher_weights needs tuples of teacher_hidden and teacher_head, "
                       f"got teacher_weights={teacher_weights!r} with single arrays")
    return (teacher_hidden,), (teacher_head,)
  hidden, head = tuple(teacher_hidden), tuple(teacher_head)
  weights = (1.0,) * len(hidden) if teacher_weights is None else teacher_weights
  if not hidden or len(head) != len(hidden) or len(weights) != len(hidden):
    raise ValueError(
        f"teacher terms must be non-empty and of one count: got {len(hidden)} hidden, "
        f"{len(head)} heads and {len(weights)} teacher_weights")
  return hidden, head


def _check_student(student_hidden, student_head):
  """Raises ValueError unless hidden [N, L, D] and head [D, V] fit."""
  if student_hidden.ndim != 3:
    raise ValueError(f"student_hidden must be [N, L, D], got {student_hidden.shape}")
  if student_head.ndim != 2:
    raise ValueError(f"student_head must be [D, V], got {student_head.shape}")
  if student_hidden.shape[2] != student_head.shape[0]:
    raise ValueError(f"student_hidden has D={student_hidden.shape[2]} but student_head has "
                     f"D={student_head.shape[0]}")


def _check_teacher(teacher_hidden, teacher_head, vocab: int) -> dict:
  """Raises ValueError unless each teacher term fits; returns {name: its [N, L]}."""
  per_position = {}
  for i, (t_hidden, t_head) in enumerate(zip(teacher_hidden, teacher_head)):
    suffix = f"[{i}]" if len(teacher_hidden) > 1 else ""
    name, head_name = "teacher_hidden" + suffix, "teacher_head" + suffix
    if t_hidden.ndim != 3:
      raise ValueError(f"{name} must be [N, L, D], got {t_hidden.shape}")
    if t_head.ndim != 2:
      raise ValueError(f"{head_name} must be [D, V], got {t_head.shape}")
    if vocab != t_head.shape[1]:
      raise ValueError(f"vocabulary sizes differ: student_head has V={vocab}, "
                       f"{head_name} has V={t_head.shape[1]}")
    if t_hidden.shape[2] != t_head.shape[0]:
      raise ValueError(f"{name} has D={t_hidden.shape[2]} but {head_name} has "
                       f"D={t_head.shape[0]}")
    per_position[name] = t_hidden.shape[:2]
  return per_position


def _check_inputs(student_hidden, teacher_hidden, student_head, teacher_head, targets,
                  token_weights, sampler_logp):
  """Raises ValueError on inconsistent shapes, non-integer targets or L = 0."""
  _check_student(student_hidden, student_head)
  n, length, _ = student_hidden.shape
  per_position = {"targets": targets.shape, "token_weights": token_weights.shape,
                  **_check_teacher(teacher_hidden, teacher_head, student_head.shape[1])}
  if sampler_logp is not None:
    per_position["sampler_logp"] = sampler_logp.shape
  for name, shape in per_position.items():
    if tuple(shape) != (n, length):
      raise ValueError(
          f"{name} must be [N, L] = {(n, length)} like student_hidden, got {tuple(shape)}")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
  if length == 0:
    raise ValueError(f"sequence length must be positive, got shape {student_hidden.shape}")


# ------------------------------------------------------------------ One chunk.

def _to_chunks(x: jax.Array, chunk: int) -> jax.Array:
  """[N, L, ...] -> [num_chunks, N, chunk, ...], zero-padding L (weight 0 there)."""
  n, length = x.shape[:2]
  num_chunks = -(-length // chunk)
  x = jnp.pad(x, [(0, 0), (0, num_chunks * chunk - length)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape((n, num_chunks, chunk) + x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _from_chunks(x: jax.Array, length: int) -> jax.Array:
  """[num_chunks, N, chunk, ...] -> [N, L, ...]."""
  num_chunks, n, chunk = x.shape[:3]
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape((n, num_chunks * chunk) + x.shape[3:])[:, :length]


def _logits(cfg: DistillationConfig, hidden: jax.Array, head: jax.Array) -> jax.Array:
  """[N, C, D] x [D, V] (same dtype) -> float32 [N, C, V] / temperature."""
  logits = jnp.einsum("ncd,dv->ncv", hidden, head, preferred_element_type=jnp.float32)
  return logits / cfg.temperature


def _teacher_logits(cfg: DistillationConfig, t_hs, t_heads) -> jax.Array:
  """float32 [N, C, V]: sum_i w_i t_hs[i] @ t_heads[i] / temperature."""
  weights = cfg.teacher_weights or (1.0,) * len(t_hs)
  terms = [w * _logits(cfg, h, head) for h, head, w in zip(t_hs, t_heads, weights)]
  return functools.reduce(jnp.add, terms)


def _target_logp(logp: jax.Array, tgt: jax.Array) -> jax.Array:
  """[N, C, V] log-probs at the int [N, C] targets -> [N, C]."""
  return jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]


def _chunk_terms(cfg: DistillationConfig, s_logits, t_logits, tgt):
  """Per-token loss and target log-probs of one chunk of float32 logits [N, C, V]."""
  if cfg.full_logit:
    per_token, logp_s, logp_t = _divergence(s_logits, t_logits, cfg.alpha, cfg.top_k,
                                            cfg.add_tail)
  else:
    logp_s = jax.nn.log_softmax(s_logits, axis=-1)
    logp_t = jax.nn.log_softmax(t_logits, axis=-1)
  tok_s, tok_t = _target_logp(logp_s, tgt), _target_logp(logp_t, tgt)  # [N, C]
  if not cfg.full_logit:
    per_token = jax.lax.stop_gradient(tok_s - tok_t) * tok_s
  return per_token, tok_s, tok_t


def _weighted_loss(cfg: DistillationConfig, s_logits, t_logits, tgt, weights, samp):
  """(weighted chunk loss, (per_token, tok_s, tok_t)) of float32 logits [N, C, V].

  samp: the sampler's float32 [N, C] log-probs, or None for no rollout correction.
  """
  per_token, tok_s, tok_t = _chunk_terms(cfg, s_logits, t_logits, tgt)
  values = per_token
  if samp is not None:
    tok_c = tok_s
    if cfg.sampler_temperature != cfg.temperature:
      scale = cfg.temperature / cfg.sampler_temperature
      tok_c = _target_logp(jax.nn.log_softmax(s_logits * scale, -1), tgt)
    values = values * _clipped_ratio(tok_c, samp, cfg.correction_clip)
  return _weighted_sum(values, weights), (per_token, tok_s, tok_t)


# ------------------------------------------------------------------ The scans.

def _chunked(chunk: int, *trees):
  """Each pytree of [N, L, ...] arrays (None stays None) as [num_chunks, N, chunk, ...]."""
  return tuple(jax.tree.map(lambda x: _to_chunks(x, chunk), tree) for tree in trees)


def _forward(cfg: DistillationConfig, s_hidden, s_head, t_hidden, t_head, tgt, weights,
             samp):
  """Loss and per-token outputs, 1 + (teacher terms) vocabulary matmuls."""
  length, s_dtype = s_hidden.shape[1], s_hidden.dtype
  chunk = min(cfg.chunk_size, length)
  s_head = s_head.astype(s_dtype)
  t_head = tuple(head.astype(h.dtype) for h, head in zip(t_hidden, t_head))

  def body(total, xs):
    s_h, t_h, tgt_c, w_c, samp_c = xs
    value, outs = _weighted_loss(cfg, _logits(cfg, s_h, s_head),
                                 _teacher_logits(cfg, t_h, t_head), tgt_c, w_c, samp_c)
    return total + value, outs

  xs = _chunked(chunk, s_hidden, t_hidden, tgt, weights, samp)
  total, outs = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
  return (total,) + tuple(_from_chunks(x, length) for x in outs)


def _forward_with_grad(cfg: DistillationConfig, s_hidden, s_head, t_hidden, t_head, tgt,
                       weights, samp):
  """Loss, per-token outputs and d loss / d (s_hidden, s_head), 3 + (teacher terms)
  vocabulary matmuls."""
  length, s_dtype = s_hidden.shape[1], s_hidden.dtype
  chunk = min(cfg.chunk_size, length)
  s_head_c = s_head.astype(s_dtype)
  t_head = tuple(head.astype(h.dtype) for h, head in zip(t_hidden, t_head))

  def body(carry, xs):
    total, d_head = carry  # float32 scalar, float32 [D, V]
    s_h, t_h, tgt_c, w_c, samp_c = xs
    t_logits = _teacher_logits(cfg, t_h, t_head)  # [N, C, V]
    loss_of = lambda s_logits: _weighted_loss(cfg, s_logits, t_logits, tgt_c, w_c, samp_c)
    value, pullback, outs = jax.vjp(loss_of, _logits(cfg, s_h, s_head_c), has_aux=True)
    (d_logits,) = pullback(jnp.ones((), jnp.float32))  # float32 [N, C, V]
    d_logits = (d_logits / cfg.temperature).astype(s_dtype)
    d_hidden = jnp.einsum("ncv,dv->ncd", d_logits, s_head_c,
                          preferred_element_type=jnp.float32)  # [N, C, D]
    d_head = d_head + jnp.einsum("ncd,ncv->dv", s_h, d_logits,
                                 preferred_element_type=jnp.float32)  # [D, V]
    return (total + value, d_head), (d_hidden.astype(s_dtype),) + outs

  xs = _chunked(chunk, s_hidden, t_hidden, tgt, weights, samp)
  init = (jnp.zeros((), jnp.float32), jnp.zeros(s_head.shape, jnp.float32))
  (total, d_head), outs = jax.lax.scan(body, init, xs)
  d_hidden, per_token, tok_s, tok_t = (_from_chunks(x, length) for x in outs)
  return (total, per_token, tok_s, tok_t), (d_hidden, d_head)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _distill(cfg: DistillationConfig, s_hidden, s_head, t_hidden, t_head, tgt, weights,
             samp):
  """(loss, per_token, tok_s, tok_t); differentiable in s_hidden and s_head only."""
  return _forward(cfg, s_hidden, s_head, t_hidden, t_head, tgt, weights, samp)


def _distill_fwd(cfg, s_hidden, s_head, t_hidden, t_head, tgt, weights, samp):
  """The outputs, and as residuals the gradient itself, formed chunk by chunk while the
  logits are live (so the backward pass runs no vocabulary matmul)."""
  outputs, (d_hidden, d_head) = _forward_with_grad(cfg, s_hidden, s_head, t_hidden, t_head,
                                                   tgt, weights, samp)
  return outputs, (d_hidden, d_head.astype(s_head.dtype))


def _distill_bwd(cfg, residuals, cotangents):
  """The saved gradient scaled by the loss' cotangent; the per-token outputs leave under
  stop_gradient, so theirs do not count, and nothing reaches the teacher or weights."""
  del cfg
  d_hidden, d_head = residuals
  g = cotangents[0]
  return ((g * d_hidden).astype(d_hidden.dtype), (g * d_head).astype(d_head.dtype),
          None, None, None, None, None)


_distill.defvjp(_distill_fwd, _distill_bwd)


# ------------------------------------------------------------------ Entry points.

def distill(
    cfg: DistillationConfig,
    student_hidden: jax.Array,
    teacher_hidden: jax.Array | Sequence[jax.Array],
    student_head: jax.Array,
    teacher_head: jax.Array | Sequence[jax.Array],
    targets: jax.Array,
    token_weights: jax.Array,
    sampler_logp: jax.Array | None = None,
) -> Distillation:
  """``chunked_distillation`` with its static settings in an already-checked ``cfg``.

  Checks only the arrays (shapes, target dtype, teacher terms against
  ``cfg.teacher_weights``), then runs the custom-VJP scan.
  """
  teacher_hidden, teacher_head = _teacher_terms(teacher_hidden, teacher_head,
                                                 cfg.teacher_weights)
  _check_inputs(student_hidden, teacher_hidden, student_head, teacher_head, targets,
                token_weights, sampler_logp)
  sg = jax.lax.stop_gradient
  samp = None if sampler_logp is None else sg(sampler_logp.astype(jnp.float32))
  loss, per_token, tok_s, tok_t = _distill(
      cfg, student_hidden, student_head, sg(teacher_hidden), sg(teacher_head), targets,
      sg(token_weights.astype(jnp.float32)), samp)
  return Distillation(loss=loss, per_token=sg(per_token), student_logp=sg(tok_s),
                      teacher_logp=sg(tok_t))


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
  gradient; the teacher side is under stop_gradient. Cost and memory: see the
  module docstring.

  The teacher may be a weighted sum of several models' logits (the trust-region
  teacher, ``lerp(reference, student, rate)``): pass tuples ``teacher_hidden =
  (h_1, ..., h_m)``, ``teacher_head = (W_1, ..., W_m)`` and ``teacher_weights =
  (w_1, ..., w_m)``; the teacher's logits are then ``sum_i w_i h_i @ W_i`` (before
  the temperature), and ``[N, L, V]`` logits still never exist.

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
    sampler_logp: float [N, L] log-probabilities of the targets reported by
      the sampler; None disables the rollout correction.
    teacher_weights, alpha, top_k, add_tail, temperature, chunk_size, full_logit,
      correction_clip, sampler_temperature: the static settings, see
      ``DistillationConfig`` (teacher_weights must be None for a single array).

  Returns:
    ``Distillation(loss, per_token, student_logp, teacher_logp)``; ``loss`` is a
    float32 scalar differentiable with respect to the student hidden states and
    head, the rest are float32 [N, L] without gradient.

  Raises:
    ValueError: on a bad setting (see ``DistillationConfig``), inconsistent shapes
      (including a vocabulary size mismatch between the heads) or teacher terms
      and weights of different counts.
  """
  cfg = DistillationConfig(
      alpha=alpha, top_k=top_k, add_tail=add_tail, temperature=temperature,
      chunk_size=chunk_size, full_logit=full_logit, correction_clip=correction_clip,
      sampler_temperature=sampler_temperature, teacher_weights=teacher_weights)
  return distill(cfg, student_hidden, teacher_hidden, student_head, teacher_head, targets,
                 token_weights, sampler_logp)
