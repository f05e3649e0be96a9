"""Baseline losses at the same rollout budget (MOPD spec, section 6): GRPO, DPO, SimPO,
verified SFT, on-policy pairs within a group, and chunked token log-probs."""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mopd_jax.losses.divergence import _LOG_RATIO_BOUND, _check_positive


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
