"""Matched-budget peer controls: the 2S1F budget filled with peers that carry no label signal.

The paper's ablations ask whether MOPD's gain comes from *which* peers the teacher reads or
merely from reading more tokens. Each control re-derives the 2S1F context of every rollout
(MOPD spec, section 2: primary + another + failure, condition "always") to fix its budget, then
fills that budget with other peers:

- `random_peer`: peers of the same group drawn uniformly at random, labels ignored (never the
  rollout itself).
- `unrelated_prompt`: successes of other prompts, drawn uniformly at random.
- `success_only_matched`: the same-prompt successes in 2S1F order (primary, another, then the
  next success), so the failure slot becomes an extra same-prompt success; when the group has
  too few, topped up with random successes of other prompts.

The budget is matched either by block count (`budget="blocks"`: exactly the slots the 2S1F
context uses, each showing its peer up to `peer_cap` tokens) or by token count
(`budget="tokens"`: slots filled in the order primary, another, failure until the shown tokens
add up to the 2S1F tokens; the last block is cut). Where the pool is too small the control
shows less; `PeerControl` carries the budgets so that the shortfall is reported, not hidden.

The result is the row-index structure `peer_context.assemble_teacher_prompts` consumes
(`rows` reshaped to [N], `block_lengths` reshaped to [N, 3]). The slots keep the template's
headers; pass `peer_template.TemplatePieces` with other headers to change what the teacher is told.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mopd_jax import peer_selection
from mopd_jax.choices import BUDGETS, CONTROLS
_SLOTS = 3  # primary, another, failure


class PeerControl(NamedTuple):
  """A control context for every rollout of a [B, G] batch.

  Attributes:
      rows: PeerSelection whose `primary`, `another`, `failure` are int32 [B, G] flat rows
          b*G + j of the [B*G] batch (-1 = absent) and whose bool [B, G] `mask` is True
          where the control shows at least one block.
      block_lengths: int32 [B, G, 3] tokens shown in the primary, another and failure slot
          (0 where absent); pass it reshaped to [N, 3] to the assembly.
      budget_blocks: int32 [B, G] blocks of the rollout's 2S1F context.
      budget_tokens: int32 [B, G] peer tokens of the rollout's 2S1F context (each block at
          most `peer_cap`).
  """

  rows: peer_selection.PeerSelection
  block_lengths: jax.Array
  budget_blocks: jax.Array
  budget_tokens: jax.Array


def _shown(rows: jax.Array, lengths: jax.Array, peer_cap: int) -> jax.Array:
  """Tokens a block of flat row `rows` shows: min(length, peer_cap), 0 where rows == -1."""
  return jnp.where(rows >= 0, jnp.minimum(lengths[jnp.maximum(rows, 0)], peer_cap), 0)


def _compact(candidates: jax.Array, valid: jax.Array, k: int) -> jax.Array:
  """First k valid entries along the last axis, order kept, padded with -1: int32 [..., k]."""
  order = jnp.argsort(~valid, axis=-1, stable=True)[..., :k]
  picked = jnp.take_along_axis(candidates, order, axis=-1)
  return jnp.where(jnp.take_along_axis(valid, order, axis=-1), picked, -1).astype(jnp.int32)


def _random_distinct(key: jax.Array, eligible: jax.Array, k: int) -> jax.Array:
  """k distinct indices drawn uniformly from `eligible` [..., M], in random order.

  Returns int32 [..., k]: indices along the last axis of `eligible`, -1 where fewer than k
  are eligible. The top k of i.i.d. uniform scores are a uniformly random ordered draw
  without replacement.
  """
  scores = jnp.where(eligible, jax.random.uniform(key, eligible.shape), -1.0)
  width = min(k, eligible.shape[-1])
  _, order = jax.lax.top_k(scores, width)
  if width < k:  # fewer candidates than slots
    pad = jnp.zeros(order.shape[:-1] + (k - width,), order.dtype)
    order = jnp.concatenate([order, pad], axis=-1)
  valid = jnp.take_along_axis(eligible, order, axis=-1) & (jnp.arange(k) < width)
  return jnp.where(valid, order, -1).astype(jnp.int32)


def _candidates(
    success: jax.Array, key: jax.Array, control: str, exclude_self_success: bool
) -> jax.Array:
  """Ordered, distinct candidate rows of every rollout: int32 [B, G, 3] flat rows, -1 padded."""
  batch, group = success.shape
  num_rows = batch * group
  idx = jnp.arange(group, dtype=jnp.int32)
  not_self = idx[:, None] != idx[None, :]  # [G(i), G(j)]
  group_of_row = jnp.arange(num_rows, dtype=jnp.int32) // group  # [N]
  # [B, G, N]: row n is a success of another prompt.
  other_success = jnp.broadcast_to(
      (success.reshape(-1) & (group_of_row[None, :] != jnp.arange(batch)[:, None]))[:, None, :],
      (batch, group, num_rows),
  )
  offset = (jnp.arange(batch, dtype=jnp.int32) * group)[:, None, None]

  if control == "random_peer":
    within = _random_distinct(key, jnp.broadcast_to(not_self, (batch, group, group)), _SLOTS)
    return jnp.where(within >= 0, within + offset, -1)
  if control == "unrelated_prompt":
    return _random_distinct(key, other_success, _SLOTS)
  # success_only_matched: same-prompt successes in group order (the 2S1F primary and
  # another come first), then successes of other prompts.
  same = jnp.broadcast_to(success[:, None, :], (batch, group, group))
  if exclude_self_success:
    same = same & not_self
  same_rows = jnp.broadcast_to(idx + offset, (batch, group, group))
  same_first = _compact(same_rows, same, _SLOTS)  # [B, G, 3]
  others = _random_distinct(key, other_success, _SLOTS)  # [B, G, 3]
  both = jnp.concatenate([same_first, others], axis=-1)
  return _compact(both, both >= 0, _SLOTS)


def matched_control(
    success: jax.Array,
    response_lengths: jax.Array,
    key: jax.Array,
    *,
    control: str,
    peer_cap: int,
    budget: str = "blocks",
    exclude_self_success: bool = True,
) -> PeerControl:
  """A matched-budget control context for every rollout.

  Args:
      success: bool [B, G] verifier verdicts.
      response_lengths: int32 [B, G] response tokens of every rollout (without the
          end-of-sequence token), as the assembly counts them.
      key: PRNG key; drives the 2S1F failure draw and the control's random choices.
      control: one of `CONTROLS`.
      peer_cap: most tokens of one peer block, as in the assembly.
      budget: "blocks" or "tokens" (see the module docstring).
      exclude_self_success: as in `select_peers`, for the 2S1F budget and the same-prompt
          successes of `success_only_matched`.

  Returns:
      PeerControl. All keyword arguments are static under jit.
  """
  if control not in CONTROLS:
    raise ValueError(f"control={control!r} is not one of {CONTROLS}.")
  if budget not in BUDGETS:
    raise ValueError(f"budget={budget!r} is not one of {BUDGETS}.")
  if not isinstance(peer_cap, int) or isinstance(peer_cap, bool) or peer_cap < 1:
    raise ValueError(f"peer_cap must be a positive int; got {peer_cap!r}.")
  if success.ndim != 2 or success.dtype != jnp.bool_:
    raise ValueError(
        f"success must be a bool array of shape [B, G]; got shape {success.shape} "
        f"and dtype {success.dtype}."
    )
  if response_lengths.shape != success.shape:
    raise ValueError(
        f"response_lengths must have shape {success.shape}; got {response_lengths.shape}."
    )
  budget_key, control_key = jax.random.split(key)
  lengths = response_lengths.reshape(-1).astype(jnp.int32)  # [N]

  base = peer_selection.to_row_indices(
      peer_selection.select_peers(success, budget_key, exclude_self_success=exclude_self_success)
  )
  base_rows = jnp.stack([base.primary, base.another, base.failure], axis=-1)  # [B, G, 3]
  used = base_rows >= 0
  budget_blocks = used.sum(axis=-1).astype(jnp.int32)
  budget_tokens = _shown(base_rows, lengths, peer_cap).sum(axis=-1).astype(jnp.int32)

  candidates = _candidates(success, control_key, control, exclude_self_success)  # [B, G, 3]
  if budget == "blocks":
    # The k-th slot the 2S1F context uses takes the k-th candidate.
    rank = jnp.maximum(jnp.cumsum(used, axis=-1) - 1, 0)
    rows = jnp.where(used, jnp.take_along_axis(candidates, rank, axis=-1), -1)
    block_lengths = _shown(rows, lengths, peer_cap)
  else:
    natural = _shown(candidates, lengths, peer_cap)  # [B, G, 3]
    before = jnp.cumsum(natural, axis=-1) - natural
    remaining = budget_tokens[..., None] - before
    on = (candidates >= 0) & (remaining > 0)
    rows = jnp.where(on, candidates, -1)
    block_lengths = jnp.where(on, jnp.minimum(natural, remaining), 0)
  rows = rows.astype(jnp.int32)
  selection = peer_selection.PeerSelection(
      primary=rows[..., 0], another=rows[..., 1], failure=rows[..., 2], mask=(rows >= 0).any(-1)
  )
  return PeerControl(
      rows=selection,
      block_lengths=block_lengths.astype(jnp.int32),
      budget_blocks=budget_blocks,
      budget_tokens=budget_tokens,
  )
