"""Peer selection: which peers each rollout's teacher sees, as index tensors.

Rollouts come in groups: B prompts, G rollouts each, flattened to N = B*G rows with
row = b*G + j. For every rollout i of a group, `select_peers` picks the peers whose responses the
teacher reads (MOPD spec, section 2):

- primary = first success j (lowest index), j != i when `exclude_self_success`;
- another = first success j != the primary candidate, and j != i when `exclude_self_success`
  (without it a rollout may see itself as `another`, as the authors' code does);
- failure = uniformly random failure j != i, attached always or only when no primary exists.

`to_row_indices` turns the within-group indices into flat rows, and `select_summary_members`
draws the group members whose summaries the teacher reads in the summaries variant. The
teacher prompts themselves are assembled from these indices in `peer_context`.
"""

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mopd_jax.choices import FAILURE_CONDITIONS


class PeerSelection(NamedTuple):
  """Peers chosen for every rollout of a [B, G] batch of groups.

  Attributes:
      primary: int32 [B, G], shown primary success (-1 when absent or not shown).
      another: int32 [B, G], second success (-1 when absent).
      failure: int32 [B, G], failure peer (-1 when absent).
      mask: bool [B, G], True when the teacher context holds at least one block; rollouts
          with False take no part in the loss.

  `select_peers` returns indices within the group (0..G-1); `to_row_indices` turns them into
  flat rows b*G + j of the [B*G] batch.
  """

  primary: jax.Array
  another: jax.Array
  failure: jax.Array
  mask: jax.Array


def _first_true(candidates: jax.Array) -> jax.Array:
  """Lowest index along the last axis where `candidates` is True, else -1 (int32)."""
  first = jnp.argmax(candidates, axis=-1).astype(jnp.int32)
  return jnp.where(candidates.any(axis=-1), first, -1)


def select_peers(
    success: jax.Array,
    key: jax.Array,
    *,
    include_primary: bool = True,
    include_another: bool = True,
    include_failure: bool = True,
    failure_condition: str = "always",
    exclude_self_success: bool = True,
    has_feedback: jax.Array | None = None,
) -> PeerSelection:
  """Chooses the peers of every rollout within its group.

  Args:
      success: bool [B, G], verifier verdict of every rollout.
      key: PRNG key for the failure draw; every (b, i) draws independently.
      include_primary: show the primary success. Its candidate is determined either way:
          `another` skips it and "when_no_solution" means "no primary candidate exists".
      include_another: attach a second success: the first success other than the primary
          candidate, and other than the rollout itself when `exclude_self_success`.
      include_failure: attach a random failure of the group (always j != i).
      failure_condition: "always", or "when_no_solution" (only without a primary candidate).
      exclude_self_success: neither the primary nor `another` is the rollout itself. When
          False, a successful rollout may be shown its own response in either slot.
      has_feedback: optional bool [B, G]; True where the caller attaches the rollout's own
          verifier feedback, which then counts as a block for the mask.

  Returns:
      PeerSelection with within-group int32 [B, G] indices (-1 = absent) and bool [B, G]
      mask.

  All keyword arguments except `has_feedback` are static Python values under jit.
  """
  if success.ndim != 2 or success.dtype != jnp.bool_:
    raise ValueError(
        f"success must be a bool array of shape [B, G]; got shape {success.shape} "
        f"and dtype {success.dtype}."
    )
  if failure_condition not in FAILURE_CONDITIONS:
    raise ValueError(f"failure_condition={failure_condition!r} is not one of {FAILURE_CONDITIONS}.")
  if has_feedback is not None and (
      has_feedback.shape != success.shape or has_feedback.dtype != jnp.bool_
  ):
    raise ValueError(
        f"has_feedback must be a bool array of shape {success.shape}; got shape "
        f"{has_feedback.shape} and dtype {has_feedback.dtype}."
    )

  batch, group = success.shape
  absent = jnp.full((batch, group), -1, jnp.int32)
  idx = jnp.arange(group, dtype=jnp.int32)
  not_self = idx[:, None] != idx[None, :]  # [G(i), G(j)]
  success_bij = jnp.broadcast_to(success[:, None, :], (batch, group, group))

  primary_candidates = success_bij & not_self if exclude_self_success else success_bij
  primary_candidate = _first_true(primary_candidates)  # [B, G]

  another = absent
  if include_another:
    another = _first_true(primary_candidates & (idx != primary_candidate[..., None]))

  failure = absent
  if include_failure:
    failure_candidates = ~success_bij & not_self
    # Masked argmax of i.i.d. uniform scores = uniform choice among the candidates.
    scores = jax.random.uniform(key, (batch, group, group))
    drawn = jnp.argmax(jnp.where(failure_candidates, scores, -1.0), axis=-1)
    attach = failure_candidates.any(axis=-1)
    if failure_condition == "when_no_solution":
      attach = attach & (primary_candidate < 0)
    failure = jnp.where(attach, drawn.astype(jnp.int32), -1)

  primary = primary_candidate if include_primary else absent
  mask = (primary >= 0) | (another >= 0) | (failure >= 0)
  if has_feedback is not None:
    mask = mask | has_feedback
  return PeerSelection(primary=primary, another=another, failure=failure, mask=mask)


def to_row_indices(selection: PeerSelection) -> PeerSelection:
  """Converts within-group indices to flat row indices b*G + j (-1 stays -1).

  Args:
      selection: PeerSelection with int32 [B, G] within-group indices.

  Returns:
      PeerSelection of the same [B, G] shapes whose index fields address rows of the [B*G]
      batch (`.reshape(-1)` them to line up with it); `mask` is unchanged.
  """
  batch, group = selection.primary.shape
  offset = (jnp.arange(batch, dtype=jnp.int32) * group)[:, None]

  def convert(index):
    return jnp.where(index >= 0, index + offset, -1).astype(jnp.int32)

  return selection._replace(
      primary=convert(selection.primary),
      another=convert(selection.another),
      failure=convert(selection.failure),
  )


def select_summary_members(success: jax.Array, primary: jax.Array, num_summaries: int,
                           key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Group members whose summaries the teacher of each rollout reads.

  For rollout i: `num_summaries` members j of its group drawn uniformly at random without
  replacement among those with j != i and j != primary[i] (the shown primary; -1 excludes
  nothing more), in the order drawn, as the authors sample them; all of them when there
  are fewer candidates.

  Args:
      success: bool [B, G], verifier verdict of every rollout (the members' labels).
      primary: int32 [B, G], within-group index of the shown primary, -1 when absent.
      num_summaries: static k, slots per rollout.
      key: PRNG key of the draw; every (b, i) draws independently.

  Returns:
      members: int32 [B, G, k], within-group indices, -1 for an empty slot (the filled
          slots come first).
      successful: bool [B, G, k], the member's verdict (False on empty slots).
  """
  if success.ndim != 2 or success.dtype != jnp.bool_:
    raise ValueError(
        f"success must be a bool array of shape [B, G]; got shape {success.shape} "
        f"and dtype {success.dtype}.")
  if primary.shape != success.shape:
    raise ValueError(f"primary must have shape {success.shape}; got {primary.shape}.")
  if not isinstance(num_summaries, numbers.Integral) or num_summaries < 1:
    raise ValueError(f"num_summaries must be a positive int; got {num_summaries!r}.")
  batch, group = success.shape
  idx = jnp.arange(group, dtype=jnp.int32)
  candidates = (idx[None, None, :] != idx[None, :, None]) & (
      idx[None, None, :] != primary[:, :, None])  # [B, G(i), G(j)]
  # The k largest of i.i.d. uniform scores, in decreasing order, are a uniform random
  # sample without replacement in random order; non-candidates score -1 and come last.
  scores = jnp.where(candidates, jax.random.uniform(key, (batch, group, group)), -1.0)
  k = min(int(num_summaries), group)
  top, drawn = jax.lax.top_k(scores, k)  # [B, G, k]
  members = jnp.where(top >= 0.0, drawn.astype(jnp.int32), -1)
  if k < num_summaries:
    members = jnp.pad(members, ((0, 0), (0, 0), (0, num_summaries - k)), constant_values=-1)
  successful = jnp.take_along_axis(
      success, jnp.maximum(members, 0).reshape(batch, group * num_summaries), axis=1
  ).reshape(batch, group, num_summaries)
  return members, successful & (members >= 0)
