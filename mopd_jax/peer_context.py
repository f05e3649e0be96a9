"""Teacher-prompt assembly as padded, batched token tensors.

`assemble_teacher_prompts` builds the teacher prompt of every rollout from token ids only,
reading the peers chosen by `peer_selection` (MOPD spec, section 2):

    real[:ins] + solution + summaries + another + failure + feedback + closing + real[ins:]

where `real` is the unpadded prompt and `ins` the insertion index of the peer context (the part
after it is the chat suffix / generation prompt). Every peer block is capped to `peer_cap`
tokens (a summary to `summary_cap`), so the result always fits the static length from
`teacher_prompt_length` and the closing instruction and generation prompt always survive. The
output is left-padded, so response tokens appended after it sit at the same positions in every
row.

The summaries variant (`insert_piece`) also asks the student, at the same insertion index of its
training prompts (not at evaluation), for a one-sentence <summary> of its approach; the teacher
then reads the summaries of up to k other group members drawn at random
(`peer_selection.select_summary_members`).
"""

import numbers
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

# Selection moved to peer_selection; re-exported here, as peer_context.select_peers is public API.
from mopd_jax.peer_selection import (  # noqa: F401
  FAILURE_CONDITIONS,
  PeerSelection,
  select_peers,
  select_summary_members,
  to_row_indices,
)


class TemplatePieces(NamedTuple):
  """Tokenized template text, fixed at start-up; each field is int32 [length].

  Attributes:
      solution_header: "\\nCorrect solution:\\n\\n".
      another_header: "\\nAnother successful solution:\\n\\n".
      failure_header: "\\nA known failed solution (avoid repeating this mistake):\\n\\n".
      feedback_header:
          "\\nThe following is feedback from your unsuccessful earlier attempt:\\n\\n".
      closing: "\\n\\nCorrectly solve the original question.".
      summary_instruction: the student's request for a summary (summaries variant only;
          None when not tokenized).
      summaries_header: "\\nSummaries of other attempts:\\n" (summaries variant only).
      summary_success: "\\n- successful: " before a successful member's summary.
      summary_failure: "\\n- unsuccessful: " before an unsuccessful member's summary.
  """

  solution_header: jax.Array
  another_header: jax.Array
  failure_header: jax.Array
  feedback_header: jax.Array
  closing: jax.Array
  summary_instruction: Optional[jax.Array] = None
  summaries_header: Optional[jax.Array] = None
  summary_success: Optional[jax.Array] = None
  summary_failure: Optional[jax.Array] = None

  def summary_pieces(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(instruction, header, success label, failure label); raises if not tokenized."""
    values = (self.summary_instruction, self.summaries_header, self.summary_success,
              self.summary_failure)
    if any(v is None for v in values):
      raise ValueError("The summaries variant needs TemplatePieces with summary_instruction, "
                       "summaries_header, summary_success and summary_failure "
                       "(see tokenize_pieces).")
    return values


def insert_piece(prompt_tokens: jax.Array, prompt_mask: jax.Array, insert_index: jax.Array,
                 piece: jax.Array, pad_id: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Inserts a constant token piece into every left-padded prompt at its insertion index.

  Args:
      prompt_tokens: int32 [N, Lp], left-padded prompts.
      prompt_mask: bool [N, Lp], True on real tokens (contiguous at the right end).
      insert_index: int32 [N], counted within the real tokens; clipped to [0, real length].
      piece: int32 [Li], the tokens inserted.
      pad_id: static padding token id.

  Returns:
      tokens int32 [N, Lp + Li] = left-pad + real[:ins] + piece + real[ins:],
      mask bool [N, Lp + Li], True on real tokens,
      insert_index int32 [N] = ins + Li, the end of the inserted piece (peer context
          inserted there follows it).
  """
  num_rows, prompt_len = prompt_tokens.shape
  _check_shape("prompt_mask", prompt_mask, prompt_tokens.shape)
  _check_shape("insert_index", insert_index, (num_rows,))
  piece_len = piece.shape[0]
  out_len = prompt_len + piece_len
  real_len = prompt_mask.sum(axis=1).astype(jnp.int32)
  ins = jnp.clip(insert_index.astype(jnp.int32), 0, real_len)
  pad = out_len - real_len - piece_len  # [N]
  rel = jnp.arange(out_len, dtype=jnp.int32)[None, :] - pad[:, None]  # within the real text
  real_start = prompt_len - real_len
  # Source buffer [N, Lp + Li]: prompt | piece.
  source = jnp.concatenate(
      [prompt_tokens.astype(jnp.int32),
       jnp.broadcast_to(piece.astype(jnp.int32), (num_rows, piece_len))], axis=1)
  before = real_start[:, None] + rel
  inside = prompt_len + rel - ins[:, None]
  after = real_start[:, None] + rel - piece_len
  src = jnp.where(rel < ins[:, None], before,
                  jnp.where(rel < ins[:, None] + piece_len, inside, after))
  mask = rel >= 0
  src = jnp.clip(src, 0, out_len - 1)
  tokens = jnp.where(mask, jnp.take_along_axis(source, src, axis=1), pad_id)
  return tokens.astype(jnp.int32), mask, ins + piece_len


def teacher_prompt_length(
    prompt_len: int,
    pieces: TemplatePieces,
    peer_cap: int,
    feedback_cap: int = 0,
    num_summaries: int = 0,
    summary_cap: int = 0,
) -> int:
  """Static length Ltp of the teacher-prompt buffer (Python int).

  Args:
      prompt_len: Lp, padded length of the original prompts.
      pieces: tokenized template pieces.
      peer_cap: most tokens of one peer response shown.
      feedback_cap: most tokens of feedback shown; 0 reserves no room for feedback.
      num_summaries: k summary slots; 0 reserves no room for summaries.
      summary_cap: most tokens of one summary shown.
  """
  for name, value in (
      ("prompt_len", prompt_len),
      ("peer_cap", peer_cap),
      ("feedback_cap", feedback_cap),
      ("num_summaries", num_summaries),
      ("summary_cap", summary_cap),
  ):
    if not isinstance(value, numbers.Integral) or value < 0:
      raise ValueError(f"{name} must be a non-negative int; got {value!r}.")
  length = (
      prompt_len
      + len(pieces.solution_header)
      + peer_cap
      + len(pieces.another_header)
      + peer_cap
      + len(pieces.failure_header)
      + peer_cap
      + len(pieces.closing)
  )
  if feedback_cap > 0:
    length += len(pieces.feedback_header) + feedback_cap
  if num_summaries > 0:
    _, header, success_label, failure_label = pieces.summary_pieces()
    label = max(len(success_label), len(failure_label))
    length += len(header) + num_summaries * (label + summary_cap)
  return int(length)


def _check_shape(name: str, array: jax.Array, shape: tuple) -> None:
  """Raises ValueError unless `array` has exactly `shape`."""
  if array.shape != shape:
    raise ValueError(f"{name} must have shape {shape}; got {array.shape}.")


def _check_feedback(num_rows: int, feedback_tokens: jax.Array | None,
                    feedback_lengths: jax.Array | None, feedback_cap: int) -> None:
  """Raises ValueError unless the feedback inputs of `assemble_teacher_prompts` agree."""
  if feedback_tokens is not None:
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


def _check_summaries(num_rows: int, summary_tokens: jax.Array | None,
                     summary_lengths: jax.Array | None, summary_rows: jax.Array | None,
                     summary_successful: jax.Array | None, summary_cap: int) -> int:
  """Checks the summary inputs of `assemble_teacher_prompts`; returns k (0 without them)."""
  if summary_tokens is None:
    return 0
  if summary_cap <= 0:
    raise ValueError(f"summary_tokens needs summary_cap > 0; got summary_cap={summary_cap}.")
  if summary_lengths is None or summary_rows is None or summary_successful is None:
    raise ValueError("summary_tokens needs summary_lengths, summary_rows and "
                     "summary_successful.")
  if summary_tokens.ndim != 2 or summary_rows.ndim != 2:
    raise ValueError(f"summary_tokens must have shape [R, Ls] and summary_rows [N, k]; got "
                     f"{summary_tokens.shape} and {summary_rows.shape}.")
  _check_shape("summary_lengths", summary_lengths, (summary_tokens.shape[0],))
  num_summaries = summary_rows.shape[1]
  _check_shape("summary_rows", summary_rows, (num_rows, num_summaries))
  _check_shape("summary_successful", summary_successful, (num_rows, num_summaries))
  return num_summaries


def _gather_segments(source: jax.Array, segments: list[tuple[jax.Array, jax.Array]],
                     out_len: int, pad_id: int) -> tuple[jax.Array, jax.Array]:
  """Concatenates per-row segments of `source` into left-padded rows.

  Args:
      source: int32 [N, S], the buffer every segment is read from.
      segments: in output order, (start [N], length [N]) of each segment within `source`;
          the lengths of a row sum to at most `out_len`.
      out_len: static length Ltp of the output rows.
      pad_id: static padding token id.

  Returns:
      tokens int32 [N, Ltp], the segments of each row back to back after its left padding,
      mask bool [N, Ltp], True on real tokens.
  """
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
    summary_tokens: Optional[jax.Array] = None,
    summary_lengths: Optional[jax.Array] = None,
    summary_rows: Optional[jax.Array] = None,
    summary_successful: Optional[jax.Array] = None,
    summary_cap: int = 0,
) -> tuple[jax.Array, jax.Array]:
  """Builds left-padded teacher prompts by index arithmetic and gathers.

  Teacher prompt of row n (bracketed blocks are empty when absent):

      real[:ins] + [solution_header + primary]
                 + [summaries_header + (label + summary) per shown member]
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
      summary_tokens: optional int32 [R, Ls], right-padded summaries of the responses.
      summary_lengths: int32 [R], required with `summary_tokens`.
      summary_rows: int32 [N, k], required with `summary_tokens`; flat rows of the members
          whose summaries row n shows, in order (-1 = empty slot).
      summary_successful: bool [N, k], required with `summary_tokens`; picks the label.
      summary_cap: static; a summary shows at most this many tokens; must be > 0 when
          `summary_tokens` is given.

  Returns:
      tokens: int32 [N, Ltp], left-padded with `pad_id`, where Ltp =
          teacher_prompt_length(Lp, pieces, peer_cap, feedback_cap, k, summary_cap).
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
  _check_feedback(num_rows, feedback_tokens, feedback_lengths, feedback_cap)
  with_summaries = summary_tokens is not None
  num_summaries = _check_summaries(num_rows, summary_tokens, summary_lengths, summary_rows,
                                   summary_successful, summary_cap)
  out_len = teacher_prompt_length(prompt_len, pieces, peer_cap, feedback_cap, num_summaries,
                                  summary_cap)

  # Source buffer [N, S]: prompt | template pieces | primary | another | failure | feedback.
  piece_list = [
      pieces.solution_header,
      pieces.another_header,
      pieces.failure_header,
      pieces.feedback_header,
      pieces.closing,
  ]
  piece_starts, start = [], prompt_len
  for piece in piece_list:
    piece_starts.append(start)
    start += piece.shape[0]
  sh_start, ah_start, fh_start, fbh_start, cl_start = piece_starts
  if with_summaries:
    _, sum_header, sum_success, sum_failure = pieces.summary_pieces()
    piece_list += [sum_header, sum_success, sum_failure]
    sum_header_start = start
    sum_success_start = sum_header_start + sum_header.shape[0]
    sum_failure_start = sum_success_start + sum_success.shape[0]
    start = sum_failure_start + sum_failure.shape[0]
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
  if with_summaries:
    summary_start = feedback_start + (feedback_width if with_feedback else 0)
    summary_width = min(summary_tokens.shape[1], summary_cap)
    summary_on = summary_rows >= 0  # [N, k]
    safe_rows = jnp.where(summary_on, summary_rows, 0)
    summary_text = summary_tokens[safe_rows, :summary_width].astype(jnp.int32)  # [N, k, W]
    sources.append(summary_text.reshape(num_rows, num_summaries * summary_width))
    summary_len = jnp.where(
        summary_on, jnp.clip(summary_lengths[safe_rows], 0, summary_width), 0)
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
  ]
  if with_summaries:
    segments.append((fixed(sum_header_start), piece_len(sum_header, summary_on.any(axis=1))))
    for slot in range(num_summaries):
      good, on = summary_successful[:, slot], summary_on[:, slot]
      label_start = jnp.where(good, sum_success_start, sum_failure_start)
      label_len = jnp.where(good, sum_success.shape[0], sum_failure.shape[0])
      segments.append((label_start.astype(jnp.int32), jnp.where(on, label_len, 0)))
      segments.append((fixed(summary_start + slot * summary_width), summary_len[:, slot]))
  segments += [
      (fixed(ah_start), piece_len(pieces.another_header, another_on)),
      (fixed(peer_start + peer_width), another_len),
      (fixed(fh_start), piece_len(pieces.failure_header, failure_on)),
      (fixed(peer_start + 2 * peer_width), failure_len),
      (fixed(fbh_start), piece_len(pieces.feedback_header, feedback_on)),
      (fixed(feedback_start), feedback_len),
      (fixed(cl_start), fixed(pieces.closing.shape[0])),
      (real_start + ins, real_len - ins),
  ]
  return _gather_segments(source, segments, out_len, pad_id)




# Template text of the teacher prompt (MOPD spec, section 2); each piece is tokenized once.
TEMPLATE_TEXTS = {
    "solution_header": "\nCorrect solution:\n\n",
    "another_header": "\nAnother successful solution:\n\n",
    "failure_header": "\nA known failed solution (avoid repeating this mistake):\n\n",
    "feedback_header": "\nThe following is feedback from your unsuccessful earlier attempt:\n\n",
    "closing": "\n\nCorrectly solve the original question.",
    # Summaries variant: the student's request (the authors' text; the newline before it
    # is the project's), then the teacher's block (the project's labels: the spec does not
    # restate the authors' item templates).
    "summary_instruction": "\nAfter your answer, briefly summarize your key approach in one "
                           "sentence inside <summary> tags, e.g. <summary>...</summary>.",
    "summaries_header": "\nSummaries of other attempts:\n",
    "summary_success": "\n- successful: ",
    "summary_failure": "\n- unsuccessful: ",
}


def tokenize_pieces(tokenizer) -> TemplatePieces:
  """TemplatePieces from a tokenizer with `encode(text) -> list[int]`."""
  return TemplatePieces(
      **{
          name: jnp.asarray(tokenizer.encode(text), jnp.int32)
          for name, text in TEMPLATE_TEXTS.items()
      }
  )
