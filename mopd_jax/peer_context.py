"""Peer selection and teacher-prompt assembly as padded, batched token tensors.

Rollouts come in groups: B prompts, G rollouts each, flattened to N = B*G rows with
row = b*G + j. For every rollout i of a group, `select_peers` picks the peers whose responses the
teacher reads (MOPD spec, section 2):

- primary = first success j (lowest index), j != i when `exclude_self_success`;
- another = first success j != the primary candidate, and j != i when `exclude_self_success`
  (without it a rollout may see itself as `another`, as the authors' code does);
- failure = uniformly random failure j != i, attached always or only when no primary exists.

`assemble_teacher_prompts` then builds the teacher prompt from token ids only:

    real[:ins] + solution + another + failure + feedback + closing + real[ins:]

where `real` is the unpadded prompt and `ins` the insertion index of the peer context (the part
after it is the chat suffix / generation prompt). Every peer block is capped to `peer_cap`
tokens, so the result always fits the static length from `teacher_prompt_length` and the
closing instruction and generation prompt always survive. The output is left-padded, so response
tokens appended after it sit at the same positions in every row.
"""

import numbers
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

FAILURE_CONDITIONS = ("always", "when_no_solution")


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


class TemplatePieces(NamedTuple):
  """Tokenized template text, fixed at start-up; each field is int32 [length].

  Attributes:
      solution_header: "\\nCorrect solution:\\n\\n".
      solution_trailer: "\\n\\n" after the primary solution.
      another_header: "\\nAnother successful solution:\\n\\n".
      failure_header: "\\nA known failed solution (avoid repeating this mistake):\\n\\n".
      feedback_header:
          "\\nThe following is feedback from your unsuccessful earlier attempt:\\n\\n".
      closing: "\\n\\nCorrectly solve the original question.".
  """

  solution_header: jax.Array
  solution_trailer: jax.Array
  another_header: jax.Array
  failure_header: jax.Array
  feedback_header: jax.Array
  closing: jax.Array


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
    has_feedback: Optional[jax.Array] = None,
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


def teacher_prompt_length(
    prompt_len: int, pieces: TemplatePieces, peer_cap: int, feedback_cap: int = 0
) -> int:
  """Static length Ltp of the teacher-prompt buffer (Python int).

  Args:
      prompt_len: Lp, padded length of the original prompts.
      pieces: tokenized template pieces.
      peer_cap: most tokens of one peer response shown.
      feedback_cap: most tokens of feedback shown; 0 reserves no room for feedback.
  """
  for name, value in (
      ("prompt_len", prompt_len),
      ("peer_cap", peer_cap),
      ("feedback_cap", feedback_cap),
  ):
    if not isinstance(value, numbers.Integral) or value < 0:
      raise ValueError(f"{name} must be a non-negative int; got {value!r}.")
  length = (
      prompt_len
      + len(pieces.solution_header)
      + peer_cap
      + len(pieces.solution_trailer)
      + len(pieces.another_header)
      + peer_cap
      + len(pieces.failure_header)
      + peer_cap
      + len(pieces.closing)
  )
  if feedback_cap > 0:
    length += len(pieces.feedback_header) + feedback_cap
  return int(length)


def _check_shape(name: str, array: jax.Array, shape: tuple) -> None:
  """Raises ValueError unless `array` has exactly `shape`."""
  if array.shape != shape:
    raise ValueError(f"{name} must have shape {shape}; got {array.shape}.")


def assemble_teacher_prompts(
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    insert_index: jax.Array,
    responses: jax.Array,
    response_lengths: jax.Array,
    rows: PeerSelection,
    pieces: TemplatePieces,
    *,
    peer_cap: int,
    pad_id: int,
    feedback_tokens: Optional[jax.Array] = None,
    feedback_lengths: Optional[jax.Array] = None,
    feedback_cap: int = 0,
    block_lengths: Optional[jax.Array] = None,
) -> tuple[jax.Array, jax.Array]:
  """Builds left-padded teacher prompts by index arithmetic and gathers.

  Teacher prompt of row n (bracketed blocks are empty when absent):

      real[:ins] + [solution_header + primary + solution_trailer]
                 + [another_header + another] + [failure_header + failure]
                 + [feedback_header + feedback] + closing + real[ins:]

  Args:
      prompt_tokens: int32 [N, Lp], left-padded prompts.
      prompt_mask: bool [N, Lp], True on real tokens (contiguous at the right end).
      insert_index: int32 [N], where the peer context goes, counted within the real prompt
          tokens; clipped to [0, number of real tokens].
      responses: int32 [R, Lr], right-padded peer responses (usually R = N).
      response_lengths: int32 [R], response tokens without the end-of-sequence token.
      rows: PeerSelection whose `primary`, `another`, `failure` are int32 [N] flat row
          indices into `responses` (-1 = absent); `mask` is not used.
      pieces: tokenized template pieces.
      peer_cap: static; a peer block shows responses[row, :min(length, peer_cap)].
      pad_id: static padding token id.
      feedback_tokens: optional int32 [N, Lf], right-padded own verifier feedback.
      feedback_lengths: int32 [N], required with `feedback_tokens`; the feedback block is
          present where it is > 0 and shows at most `feedback_cap` tokens.
      feedback_cap: static; room reserved for feedback (see `teacher_prompt_length`); must
          be > 0 when `feedback_tokens` is given.
      block_lengths: optional int32 [N, 3], most tokens shown of the primary, another and
          failure block of each row, on top of `peer_cap` (the matched-budget controls of
          `peer_controls` cut blocks to a token budget this way).

  Returns:
      tokens: int32 [N, Ltp], left-padded with `pad_id`, where
          Ltp = teacher_prompt_length(Lp, pieces, peer_cap, feedback_cap).
      mask: bool [N, Ltp], True on real tokens.
  """
  if prompt_tokens.ndim != 2:
    raise ValueError(f"prompt_tokens must have shape [N, Lp]; got {prompt_tokens.shape}.")
  if responses.ndim != 2:
    raise ValueError(f"responses must have shape [R, Lr]; got {responses.shape}.")
  num_rows, prompt_len = prompt_tokens.shape
  _check_shape("prompt_mask", prompt_mask, prompt_tokens.shape)
  _check_shape("insert_index", insert_index, (num_rows,))
  _check_shape("response_lengths", response_lengths, (responses.shape[0],))
  for field in ("primary", "another", "failure"):
    _check_shape(f"rows.{field}", getattr(rows, field), (num_rows,))
  if block_lengths is not None:
    _check_shape("block_lengths", block_lengths, (num_rows, 3))
  with_feedback = feedback_tokens is not None
  if with_feedback:
    if feedback_cap <= 0:
      raise ValueError(f"feedback_tokens needs feedback_cap > 0; got feedback_cap={feedback_cap}.")
    if feedback_lengths is None:
      raise ValueError("feedback_tokens is given but feedback_lengths is None.")
    if feedback_tokens.ndim != 2 or feedback_tokens.shape[0] != num_rows:
      raise ValueError(
          f"feedback_tokens must have shape ({num_rows}, Lf); " f"got {feedback_tokens.shape}."
      )
    _check_shape("feedback_lengths", feedback_lengths, (num_rows,))
  elif feedback_lengths is not None:
    raise ValueError("feedback_lengths is given but feedback_tokens is None.")
  out_len = teacher_prompt_length(prompt_len, pieces, peer_cap, feedback_cap)

  # Source buffer [N, S]: prompt | template pieces | primary | another | failure | feedback.
  piece_list = [
      pieces.solution_header,
      pieces.solution_trailer,
      pieces.another_header,
      pieces.failure_header,
      pieces.feedback_header,
      pieces.closing,
  ]
  piece_starts, start = [], prompt_len
  for piece in piece_list:
    piece_starts.append(start)
    start += piece.shape[0]
  sh_start, st_start, ah_start, fh_start, fbh_start, cl_start = piece_starts
  peer_start = start
  peer_width = min(responses.shape[1], peer_cap)
  feedback_start = peer_start + 3 * peer_width

  def gather_peer(row_index, slot):
    present = row_index >= 0
    safe = jnp.where(present, row_index, 0)
    text = responses[safe, :peer_width].astype(jnp.int32)  # [N, W]
    length = jnp.clip(response_lengths[safe], 0, peer_width)
    if block_lengths is not None:
      length = jnp.clip(length, 0, block_lengths[:, slot])
    return text, jnp.where(present, length, 0), present

  primary_text, primary_len, primary_on = gather_peer(rows.primary, 0)
  another_text, another_len, another_on = gather_peer(rows.another, 1)
  failure_text, failure_len, failure_on = gather_peer(rows.failure, 2)
  constant = jnp.concatenate([piece.astype(jnp.int32) for piece in piece_list])
  sources = [
      prompt_tokens.astype(jnp.int32),
      jnp.broadcast_to(constant, (num_rows, constant.shape[0])),
      primary_text,
      another_text,
      failure_text,
  ]
  if with_feedback:
    feedback_width = min(feedback_tokens.shape[1], feedback_cap)
    sources.append(feedback_tokens[:, :feedback_width].astype(jnp.int32))
    feedback_on = feedback_lengths > 0
    feedback_len = jnp.where(feedback_on, jnp.clip(feedback_lengths, 0, feedback_width), 0)
  else:
    feedback_on = jnp.zeros((num_rows,), bool)
    feedback_len = jnp.zeros((num_rows,), jnp.int32)
  source = jnp.concatenate(sources, axis=1)  # [N, S]

  real_len = prompt_mask.sum(axis=1).astype(jnp.int32)
  real_start = prompt_len - real_len
  ins = jnp.clip(insert_index.astype(jnp.int32), 0, real_len)

  def fixed(value):
    return jnp.full((num_rows,), value, jnp.int32)

  def piece_len(piece, on):
    return jnp.where(on, piece.shape[0], 0)

  # Segments in output order, each (source start [N], length [N]).
  segments = [
      (real_start, ins),
      (fixed(sh_start), piece_len(pieces.solution_header, primary_on)),
      (fixed(peer_start), primary_len),
      (fixed(st_start), piece_len(pieces.solution_trailer, primary_on)),
      (fixed(ah_start), piece_len(pieces.another_header, another_on)),
      (fixed(peer_start + peer_width), another_len),
      (fixed(fh_start), piece_len(pieces.failure_header, failure_on)),
      (fixed(peer_start + 2 * peer_width), failure_len),
      (fixed(fbh_start), piece_len(pieces.feedback_header, feedback_on)),
      (fixed(feedback_start), feedback_len),
      (fixed(cl_start), fixed(pieces.closing.shape[0])),
      (real_start + ins, real_len - ins),
  ]
  src_start = jnp.stack([s for s, _ in segments], axis=1).astype(jnp.int32)  # [N, K]
  seg_len = jnp.stack([n for _, n in segments], axis=1).astype(jnp.int32)  # [N, K]
  pad = out_len - seg_len.sum(axis=1)  # [N]
  out_start = pad[:, None] + jnp.cumsum(seg_len, axis=1) - seg_len  # [N, K]

  # Segment of each output position = the last segment starting at or before it; an empty
  # segment shares its start with the next one and is skipped that way. Positions before
  # `pad` are padding and take segment 0 only to keep the gather in range.
  position = jnp.arange(out_len, dtype=jnp.int32)
  segment = (position[None, :, None] >= out_start[:, None, :]).sum(axis=2) - 1  # [N, Ltp]
  segment = jnp.maximum(segment, 0)
  offset = position[None, :] - jnp.take_along_axis(out_start, segment, axis=1)
  src = jnp.clip(jnp.take_along_axis(src_start, segment, axis=1) + offset, 0, source.shape[1] - 1)
  mask = position[None, :] >= pad[:, None]
  tokens = jnp.where(mask, jnp.take_along_axis(source, src, axis=1), pad_id)
  return tokens.astype(jnp.int32), mask


def teacher_positions(mask: jax.Array) -> jax.Array:
  """Position ids from a left-padded mask: cumsum(mask) - 1, clipped at 0.

  Args:
      mask: bool [..., L], True on real tokens (a prompt, or a prompt + response
          concatenation).

  Returns:
      int32 [..., L] positions; padding positions get 0.
  """
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


# Template text of the teacher prompt (MOPD spec, section 2); each piece is tokenized once.
TEMPLATE_TEXTS = {
    "solution_header": "\nCorrect solution:\n\n",
    "solution_trailer": "\n\n",
    "another_header": "\nAnother successful solution:\n\n",
    "failure_header": "\nA known failed solution (avoid repeating this mistake):\n\n",
    "feedback_header": "\nThe following is feedback from your unsuccessful earlier attempt:\n\n",
    "closing": "\n\nCorrectly solve the original question.",
}


def tokenize_pieces(tokenizer) -> TemplatePieces:
  """TemplatePieces from a tokenizer with `encode(text) -> list[int]`."""
  return TemplatePieces(
      **{
          name: jnp.asarray(tokenizer.encode(text), jnp.int32)
          for name, text in TEMPLATE_TEXTS.items()
      }
  )
