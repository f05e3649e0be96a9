"""The teacher side of one step: the student's prompts, the teacher inputs, their scoring.

A step runs sample -> verify -> teacher inputs -> losses -> update (`train_step`). This
module holds what feeds the teacher: `student_prompts` (the prompts as the student samples
them), stage 1 `build_teacher_inputs` (peers per group and every rollout's teacher prompt,
assembled by gathers into `TeacherInputs`) and stage 2 `score_with_teacher` /
`teacher_terms` (the teacher's hidden states on the response positions, stop-gradient).
The losses of stage 3 are the algorithm's (`cfg.method`, from the pieces in
`step_losses`).

Alignment of response positions: the student input is prompt [Lp] + response [Lr] and
the teacher input is teacher prompt [Ltp] + the same response; both prompts are
left-padded, so the hidden state that predicts response token t sits at index
Lp - 1 + t (student) and Ltp - 1 + t (teacher) in every row (`response_hidden`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mopd_jax import packing, peer_context, peer_controls, peer_selection, settings, teacher
from mopd_jax.models import transformer
from mopd_jax.step_types import Rollouts, StepConfig, TeacherInputs, TeacherTerms


def student_prompts(peers: settings.PeerSettings, pieces, batch, pad_id: int):
  """The batch as the student sees it in training: with peers.summaries, every prompt gets
  the summary instruction at its insertion index (prompts grow by its static length and
  the insertion index moves past it, so the teacher's context follows the instruction);
  otherwise the batch unchanged. Evaluation samples from the plain prompts."""
  if not peers.summaries:
    return batch
  instruction = pieces.summary_pieces()[0]
  tokens, mask, insert_index = peer_context.insert_piece(
      batch["prompt_tokens"], batch["prompt_mask"].astype(bool), batch["insert_index"],
      instruction, pad_id)
  return {**batch, "prompt_tokens": tokens, "prompt_mask": mask, "insert_index": insert_index}


def response_hidden(model_cfg, params, prompt_tokens, prompt_mask, responses,
                    response_mask):
  """Hidden states [N, Lr, D] that predict each response token."""
  tokens = jnp.concatenate([prompt_tokens, responses], axis=1)
  mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
  # The [B, L] token mask (causal attention over real tokens), never a dense [B, L, L]
  # mask: the attention kind builds its mask per block.
  hidden, _ = transformer.hidden_states(model_cfg, params, tokens,
                                        transformer.positions_from_mask(mask), mask)
  lp, lr = prompt_tokens.shape[1], responses.shape[1]
  return hidden[:, lp - 1:lp - 1 + lr]


def _peer_rows(pc: settings.PeerSettings, success, text_lengths, peer_key):
  """Each rollout's peers as flat rows of the batch ([N] fields), and the most tokens
  shown of each of its three blocks (int32 [N, 3], or None): the matched-budget
  control's with `peers.control`, else `select_peers`'."""
  b, g = success.shape
  flat = lambda x: x.reshape(b * g)  # noqa: E731
  if pc.control:
    control = peer_controls.matched_control(
        success, text_lengths.reshape(b, g), peer_key, control=pc.control,
        peer_cap=pc.peer_cap, budget=pc.control_budget,
        exclude_self_success=pc.exclude_self_success)
    return jax.tree.map(flat, control.rows), control.block_lengths.reshape(b * g, 3)
  selection = peer_selection.select_peers(
      success, peer_key, include_primary=pc.include_primary,
      include_another=pc.include_another, include_failure=pc.include_failure,
      failure_condition=pc.failure_condition,
      exclude_self_success=pc.exclude_self_success)
  return jax.tree.map(flat, peer_selection.to_row_indices(selection)), None


def _summaries(pc: settings.PeerSettings, rollouts: Rollouts, rows, success,
               peer_key) -> peer_context.Summaries:
  """The summaries each rollout's teacher reads: up to `peers.num_summaries` other
  members of its group, drawn at random, itself and its shown primary excluded."""
  if rollouts.summaries is None:
    raise ValueError("config.peers.summaries = True but the rollouts carry no summaries "
                     "(HostVerifier.summarize was not run on them).")
  b, g = success.shape
  n, k = b * g, min(pc.num_summaries, g - 1)
  # Flat rows -> within-group indices, and back.
  primary = jnp.where(rows.primary >= 0, rows.primary % g, -1).reshape(b, g)
  members, successful = peer_selection.select_summary_members(
      success, primary, k, jax.random.fold_in(peer_key, 1))
  offset = (jnp.arange(b, dtype=jnp.int32) * g)[:, None, None]
  summary_rows = jnp.where(members >= 0, members + offset, -1).reshape(n, k)
  return peer_context.Summaries(rollouts.summaries, rollouts.summary_lengths, summary_rows,
                                successful.reshape(n, k))


def _feedback(pc: settings.PeerSettings, rollouts: Rollouts, rows) -> peer_context.Feedback:
  """The rollout's own verifier feedback; with `peers.feedback_only_without_solution`
  only where no primary solution is shown (elsewhere its length is 0)."""
  use = rollouts.feedback_lengths > 0
  if pc.feedback_only_without_solution:
    use &= rows.primary < 0
  return peer_context.Feedback(rollouts.feedback,
                               jnp.where(use, rollouts.feedback_lengths, 0))


def build_teacher_inputs(cfg: StepConfig, pieces, batch, rollouts: Rollouts,
                         peer_key) -> TeacherInputs:
  """Stage 1: select peers per group and assemble every rollout's teacher prompt.

  An algorithm without a peer context (`cfg.method.peer_context` False: opd and the
  policy losses) gives the teacher the plain prompt, and its own `rollout_mask`.
  """
  g, pc = cfg.num_samples, cfg.peers
  b = batch["prompt_tokens"].shape[0]
  n, lr = rollouts.tokens.shape
  rep = lambda x: jnp.repeat(x, g, axis=0)  # noqa: E731
  prompt_tokens, prompt_mask = rep(batch["prompt_tokens"]), rep(batch["prompt_mask"])
  prompt_mask = prompt_mask.astype(bool)

  success = (rollouts.rewards >= cfg.success_threshold).reshape(b, g)
  response_mask = jnp.arange(lr)[None, :] < rollouts.lengths[:, None]
  advantages = cfg.method.advantages(cfg, rollouts, b)
  if advantages is None:
    advantages = jnp.zeros((n,), jnp.float32)
  if not cfg.method.peer_context:
    plain_mask = cfg.method.rollout_mask(cfg, rollouts, b)
    return TeacherInputs(prompt_tokens=prompt_tokens, prompt_mask=prompt_mask,
                         teacher_tokens=prompt_tokens, teacher_mask=prompt_mask,
                         response_mask=response_mask,
                         rollout_mask=jnp.ones((n,), bool) if plain_mask is None
                         else plain_mask,
                         advantages=advantages, success=success)
  text_lengths = rollouts.lengths - rollouts.finished.astype(jnp.int32)  # drop EOS
  rows, block_lengths = _peer_rows(pc, success, text_lengths, peer_key)
  if pc.control == "success_only_matched":  # its failure slot shows a success
    pieces = pieces._replace(failure_header=pieces.another_header)
  rollout_mask, summaries, feedback = rows.mask, None, None
  if pc.summaries:  # a shown summary counts as a block for the loss mask
    summaries = _summaries(pc, rollouts, rows, success, peer_key)
    rollout_mask |= (summaries.rows >= 0).any(axis=1)
  if pc.include_feedback:  # and so does the rollout's own feedback
    feedback = _feedback(pc, rollouts, rows)
    rollout_mask |= feedback.lengths > 0
  blocks = peer_context.PeerBlocks(rollouts.tokens, text_lengths, rows, block_lengths,
                                   feedback, summaries)
  teacher_tokens, teacher_mask = peer_context.assemble_teacher_prompts(
      prompt_tokens, prompt_mask, rep(batch["insert_index"]), blocks, pieces,
      peer_cap=pc.peer_cap, pad_id=cfg.pad_id, feedback_cap=pc.feedback_room,
      summary_cap=pc.summary_len if pc.summaries else 0)
  return TeacherInputs(prompt_tokens=prompt_tokens, prompt_mask=prompt_mask,
                       teacher_tokens=teacher_tokens, teacher_mask=teacher_mask,
                       response_mask=response_mask, rollout_mask=rollout_mask,
                       advantages=advantages, success=success)


def score_with_teacher(cfg: StepConfig, teacher_params, inputs: TeacherInputs,
                       rollouts: Rollouts, model_cfg: transformer.ModelConfig | None = None):
  """Stage 2: the teacher's hidden states [N, Lr, D] on the response positions, and its
  LM head, under stop-gradient. model_cfg: the model of `teacher_params` (default: the
  teacher's)."""
  model_cfg = model_cfg or cfg.teacher_cfg
  teacher_params = jax.lax.stop_gradient(teacher_params)
  hidden = response_hidden(model_cfg, teacher_params, inputs.teacher_tokens,
                            inputs.teacher_mask, rollouts.tokens, inputs.response_mask)
  return hidden, transformer.lm_head(model_cfg, teacher_params)


def packed_hidden(model_cfg, params, tokens, segments, positions, index, shards: int):
  """Hidden states [P, Lr, D] at the loss layout's slots from packed rows [P, L] (one
  layout of `packing.PackedRows`): each segment attends only itself, from position 0."""
  hidden, _ = transformer.hidden_states(model_cfg, params, tokens, positions, segments != 0,
                                        segment_ids=segments)
  return packing.gather_hidden(hidden, index, shards)


def teacher_terms(cfg: StepConfig, teacher_params, student_params, inputs: TeacherInputs,
                  rollouts: Rollouts) -> TeacherTerms:
  """Stage 2 as `TeacherTerms`: the teacher slot's model, or for teacher.mode
  'trust_region' the reference (the teacher slot) with weight 1 - rate and the current
  student (`student_params`) with weight rate, both reading the teacher prompt under
  stop-gradient: the student's extra forward has no backward.
  """
  return _terms(cfg, teacher_params, student_params,
                lambda params, model_cfg: score_with_teacher(cfg, params, inputs, rollouts,
                                                             model_cfg=model_cfg))


def packed_teacher_terms(cfg: StepConfig, teacher_params, student_params,
                         rows: packing.PackedRows) -> TeacherTerms:
  """`teacher_terms` on one micro-batch of packed rows: hidden states [P, Lr, D] of the
  loss layout, from the teacher layout's packed rows."""

  def score(params, model_cfg):
    params = jax.lax.stop_gradient(params)
    hidden = packed_hidden(model_cfg, params, rows.teacher_tokens, rows.teacher_segments,
                           rows.teacher_positions, rows.teacher_index, rows.shards)
    return hidden, transformer.lm_head(model_cfg, params)

  return _terms(cfg, teacher_params, student_params, score)


def _terms(cfg: StepConfig, teacher_params, student_params, score) -> TeacherTerms:
  """The teacher's terms, each scored by `score(params, model_cfg) -> (hidden, head)`."""
  terms = (("reference", 1.0),)
  if cfg.teacher.trust_region is not None:
    terms = teacher.trust_region_terms(cfg.teacher.trust_region)
  sources = {"reference": (teacher_params, cfg.teacher_cfg),
             "student": (student_params, cfg.model)}
  scored = [score(*sources[source]) for source, _ in terms]
  return TeacherTerms(hidden=tuple(h for h, _ in scored), head=tuple(w for _, w in scored),
                      weights=tuple(weight for _, weight in terms))
