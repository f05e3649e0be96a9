"""Teacher-prompt assembly as padded, batched token tensors.

`assemble_teacher_prompts` builds the teacher prompt of every rollout from token ids only,
reading the peers chosen by `peer_selection` (MOPD spec, section 2):

    real[:ins] + solution + summaries + another + failure + feedback + closing + real[ins:]

where `real` is the unpadded prompt and `ins` the insertion index of the peer context (the part
after it is the chat suffix / generation prompt). Every peer block is capped to `peer_cap`
tokens (a summary to `summary_cap`), so the result always fits the static length from
`peer_template.teacher_prompt_length` and the closing instruction and generation prompt
always survive. The output is left-padded, so response tokens appended after it sit at the
same positions in every row. The template's text and token pieces are in `peer_template`.

The summaries variant (`insert_piece`) also asks the student, at the same insertion index of its
training prompts (not at evaluation), for a one-sentence <summary> of its approach; the teacher
then reads the summaries of up to k other group members drawn at random
(`peer_selection.select_summary_members`).
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from mopd_jax import peer_template
# Selection moved to peer_selection; re-exported here, as peer_context.select_peers is public API.
from mopd_jax.peer_selection import (  # noqa: F401
  FAILURE_CONDITIONS,
  PeerSelection,
  select_peers,
  select_summary_members,
  to_row_indices,
)


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


def _check_shape(name: str, array: jax.Array, shape: tuple) -> None:
  """Raises ValueError unless `array` has exactly `shape`."""
  if array.shape != shape:
    raise ValueError(f"{name} must have shape {shape}; got {array.shape}.")


class Feedback(NamedTuple):
  """Each row's own verifier feedback; its block shows where `lengths` > 0, at most
  `feedback_cap` tokens of it."""

  tokens: jax.Array  # int32 [N, Lf], right-padded
  lengths: jax.Array  # int32 [N]


class Summaries(NamedTuple):
  """The responses' summaries and the k of them each row shows (summaries variant)."""

  tokens: jax.Array  # int32 [R, Ls], right-padded summaries of the responses
  lengths: jax.Array  # int32 [R]
  rows: jax.Array  # int32 [N, k], flat rows of the members shown, in order (-1 = empty)
  successful: jax.Array  # bool [N, k], picks each shown summary's label


class PeerBlocks(NamedTuple):
  """What the teacher prompts show besides the prompt: one pytree, None for absent parts.

  `rows` is a PeerSelection whose `primary`, `another`, `failure` are int32 [N] flat row
  indices into `responses` (-1 = absent; `mask` is not used). `block_lengths` caps the
  primary, another and failure block of each row on top of `peer_cap` (the matched-budget
  controls of `peer_controls` cut blocks to a token budget this way).
  """

  responses: jax.Array  # int32 [R, Lr], right-padded peer responses (usually R = N)
  response_lengths: jax.Array  # int32 [R], response tokens without the end-of-sequence
  rows: PeerSelection
  block_lengths: Optional[jax.Array] = None  # int32 [N, 3]
  feedback: Optional[Feedback] = None
  summaries: Optional[Summaries] = None


def _check_feedback(num_rows: int, feedback: Feedback | None, feedback_cap: int) -> None:
  """Raises ValueError unless the feedback of `assemble_teacher_prompts` fits its room."""
  if feedback is None:
    return
  if feedback_cap <= 0:
    raise ValueError(f"blocks.feedback needs feedback_cap > 0; got feedback_cap={feedback_cap}.")
  if feedback.tokens.ndim != 2 or feedback.tokens.shape[0] != num_rows:
    raise ValueError(f"blocks.feedback.tokens must have shape ({num_rows}, Lf); "
                     f"got {feedback.tokens.shape}.")
  _check_shape("blocks.feedback.lengths", feedback.lengths, (num_rows,))


def _check_summaries(num_rows: int, summaries: Summaries | None, summary_cap: int) -> int:
  """Checks the summaries of `assemble_teacher_prompts`; returns k (0 without them)."""
  if summaries is None:
    return 0
  if summary_cap <= 0:
    raise ValueError(f"blocks.summaries needs summary_cap > 0; got summary_cap={summary_cap}.")
  if summaries.tokens.ndim != 2 or summaries.rows.ndim != 2:
    raise ValueError("blocks.summaries.tokens must have shape [R, Ls] and .rows [N, k]; got "
                     f"{summaries.tokens.shape} and {summaries.rows.shape}.")
  _check_shape("blocks.summaries.lengths", summaries.lengths, (summaries.tokens.shape[0],))
  num_summaries = summaries.rows.shape[1]
  _check_shape("blocks.summaries.rows", summaries.rows, (num_rows, num_summaries))
  _check_shape("blocks.summaries.successful", summaries.successful,
               (num_rows, num_summaries))
  return num_summaries


def _check_assembly(prompt_tokens: jax.Array, prompt_mask: jax.Array,
                    insert_index: jax.Array, blocks: PeerBlocks, feedback_cap: int,
                    summary_cap: int) -> int:
  """Raises ValueError on inputs of `assemble_teacher_prompts` that do not fit together;
  returns k, the number of summary slots (0 without summaries)."""
  if prompt_tokens.ndim != 2:
    raise ValueError(f"prompt_tokens must have shape [N, Lp]; got {prompt_tokens.shape}.")
  if blocks.responses.ndim != 2:
    raise ValueError(f"blocks.responses must have shape [R, Lr]; got {blocks.responses.shape}.")
  num_rows = prompt_tokens.shape[0]
  _check_shape("prompt_mask", prompt_mask, prompt_tokens.shape)
  _check_shape("insert_index", insert_index, (num_rows,))
  _check_shape("blocks.response_lengths", blocks.response_lengths,
               (blocks.responses.shape[0],))
  for field in ("primary", "another", "failure"):
    _check_shape(f"blocks.rows.{field}", getattr(blocks.rows, field), (num_rows,))
  if blocks.block_lengths is not None:
    _check_shape("blocks.block_lengths", blocks.block_lengths, (num_rows, 3))
  _check_feedback(num_rows, blocks.feedback, feedback_cap)
  return _check_summaries(num_rows, blocks.summaries, summary_cap)


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


class _Shown(NamedTuple):
  """One block's text as read into the source buffer, and how much of it shows."""

  text: jax.Array  # int32 [N, W], W = the block's static width
  length: jax.Array  # int32 [N], tokens shown (0 when absent)
  on: jax.Array  # bool [N], the block is present (its header shows)


def _shown_rows(tokens: jax.Array, lengths: jax.Array, row_index: jax.Array,
                width: int) -> _Shown:
  """tokens[row, :width] of each row index (-1 = absent), lengths clipped to width."""
  present = row_index >= 0
  safe = jnp.where(present, row_index, 0)
  text = tokens[safe, :width].astype(jnp.int32)
  length = jnp.where(present, jnp.clip(lengths[safe], 0, width), 0)
  return _Shown(text, length, present)


def _peer_blocks(blocks: PeerBlocks, peer_cap: int) -> list[_Shown]:
  """The primary, another and failure blocks, each cut to peer_cap and block_lengths."""
  width = min(blocks.responses.shape[1], peer_cap)
  shown = []
  for slot, field in enumerate(("primary", "another", "failure")):
    part = _shown_rows(blocks.responses, blocks.response_lengths,
                       getattr(blocks.rows, field), width)
    if blocks.block_lengths is not None:
      part = part._replace(length=jnp.clip(part.length, 0, blocks.block_lengths[:, slot]))
    shown.append(part)
  return shown


def _feedback_block(feedback: Feedback | None, num_rows: int, feedback_cap: int) -> _Shown:
  """Each row's own feedback cut to feedback_cap; an empty block without feedback."""
  if feedback is None:
    return _Shown(jnp.zeros((num_rows, 0), jnp.int32), jnp.zeros((num_rows,), jnp.int32),
                  jnp.zeros((num_rows,), bool))
  width = min(feedback.tokens.shape[1], feedback_cap)
  on = feedback.lengths > 0
  return _Shown(feedback.tokens[:, :width].astype(jnp.int32),
                jnp.where(on, jnp.clip(feedback.lengths, 0, width), 0), on)


def _summary_blocks(summaries: Summaries | None, summary_cap: int) -> list[_Shown]:
  """The k summaries each row shows, one block per slot, each cut to summary_cap."""
  if summaries is None:
    return []
  width = min(summaries.tokens.shape[1], summary_cap)
  return [_shown_rows(summaries.tokens, summaries.lengths, summaries.rows[:, slot], width)
          for slot in range(summaries.rows.shape[1])]


def _source_buffer(prompt_tokens: jax.Array, template: dict[str, jax.Array],
                   shown: dict[str, _Shown]) -> tuple[jax.Array, dict[str, int]]:
  """The buffer [N, S] every segment is read from, and where each named part starts.

  Layout: prompt | template pieces | primary | another | failure | feedback | summaries.
  """
  num_rows = prompt_tokens.shape[0]
  parts = {"prompt": prompt_tokens.astype(jnp.int32)}
  parts.update({name: jnp.broadcast_to(piece.astype(jnp.int32), (num_rows, piece.shape[0]))
                for name, piece in template.items()})
  parts.update({name: part.text for name, part in shown.items()})
  starts, start = {}, 0
  for name, part in parts.items():
    starts[name] = start
    start += part.shape[1]
  return jnp.concatenate(list(parts.values()), axis=1), starts


def _segments(template: dict[str, jax.Array], starts: dict[str, int],
              shown: dict[str, _Shown], summaries: Summaries | None, real_start: jax.Array,
              real_len: jax.Array, ins: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
  """(source start [N], length [N]) of every segment of the teacher prompts, in order."""
  num_rows = ins.shape[0]

  def fixed(value):
    return jnp.full((num_rows,), value, jnp.int32)

  def header(name, on):
    return fixed(starts[name]), jnp.where(on, template[name].shape[0], 0)

  def text(name):
    return fixed(starts[name]), shown[name].length

  segments = [(real_start, ins), header("solution_header", shown["primary"].on),
              text("primary")]
  if summaries is not None:
    segments.append(header("summaries_header", (summaries.rows >= 0).any(axis=1)))
    for slot in range(summaries.rows.shape[1]):
      name, good = f"summary_{slot}", summaries.successful[:, slot]
      label_start = jnp.where(good, starts["summary_success"], starts["summary_failure"])
      label_len = jnp.where(good, template["summary_success"].shape[0],
                            template["summary_failure"].shape[0])
      segments += [(label_start.astype(jnp.int32), jnp.where(shown[name].on, label_len, 0)),
                   text(name)]
  for block, head in (("another", "another_header"), ("failure", "failure_header"),
                      ("feedback", "feedback_header")):
    segments += [header(head, shown[block].on), text(block)]
  return segments + [(fixed(starts["closing"]), fixed(template["closing"].shape[0])),
                     (real_start + ins, real_len - ins)]


def assemble_teacher_prompts(
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    insert_index: jax.Array,
    blocks: PeerBlocks,
    pieces: peer_template.TemplatePieces,
    *,
    peer_cap: int,
    pad_id: int,
    feedback_cap: int = 0,
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
      blocks: the peers' responses, which rows each prompt shows, and the optional block
          lengths, feedback and summaries (`PeerBlocks`).
      pieces: tokenized template pieces.
      peer_cap: static; a peer block shows responses[row, :min(length, peer_cap)].
      pad_id: static padding token id.
      feedback_cap: static; room reserved for feedback (see
          `peer_template.teacher_prompt_length`); must be > 0 when `blocks.feedback` is given.
      summary_cap: static; a summary shows at most this many tokens; must be > 0 when
          `blocks.summaries` is given.

  Returns:
      tokens: int32 [N, Ltp], left-padded with `pad_id`, where Ltp =
          teacher_prompt_length(Lp, pieces, peer_cap, feedback_cap, k, summary_cap).
      mask: bool [N, Ltp], True on real tokens.
  """
  num_summaries = _check_assembly(prompt_tokens, prompt_mask, insert_index, blocks,
                                  feedback_cap, summary_cap)
  num_rows, prompt_len = prompt_tokens.shape
  out_len = peer_template.teacher_prompt_length(prompt_len, pieces, peer_cap, feedback_cap,
                                                num_summaries, summary_cap)
  names = ["solution_header", "another_header", "failure_header", "feedback_header",
           "closing"]
  if blocks.summaries is not None:
    pieces.summary_pieces()  # raises unless the summary pieces are tokenized
    names += ["summaries_header", "summary_success", "summary_failure"]
  template = {name: getattr(pieces, name) for name in names}
  shown = dict(zip(("primary", "another", "failure"), _peer_blocks(blocks, peer_cap)))
  shown["feedback"] = _feedback_block(blocks.feedback, num_rows, feedback_cap)
  summaries = _summary_blocks(blocks.summaries, summary_cap)
  shown.update({f"summary_{slot}": part for slot, part in enumerate(summaries)})
  source, starts = _source_buffer(prompt_tokens, template, shown)

  real_len = prompt_mask.sum(axis=1).astype(jnp.int32)
  ins = jnp.clip(insert_index.astype(jnp.int32), 0, real_len)
  segments = _segments(template, starts, shown, blocks.summaries, prompt_len - real_len,
                       real_len, ins)
  return _gather_segments(source, segments, out_len, pad_id)
