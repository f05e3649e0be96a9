"""Padding-free update: a step's sequences packed into fixed token budgets (segment ids).

With `config.optim.packed_tokens = T` (0, the default, keeps padded rows), each
micro-batch's rows (`optim.micro_batch_rows`, or the whole batch) are packed, on device,
into rows of three layouts, each row as long as a padded row of its kind:

- student  [P, Ls], Ls = Lp + Lr, P = T / Ls: prompt + response of several rows after
  one another;
- loss     [P, Lr]: the response positions, where the chunked divergence runs;
- teacher  [Pt, Lt], Lt = Ltp + Lr, Pt = `optim.packed_teacher_tokens` / Lt (0: Pt = P):
  teacher prompt (prompt + peer context) + response. Its own budget, because teacher
  prompts carry the peer blocks, whose fill differs from the student's.

A row's real tokens form one segment (ids 1, 2, ... along a packed row, 0 = padding):
attention stays inside it (`models.attention`, `segment_ids`) and positions restart at 0,
so every hidden state equals the padded path's. The loss layout holds, per response
token, the flat index of the student's and of the teacher's hidden state that predicts
it, its target, its sampler log-prob and its weight: the whole batch's aggregation weight
of its original row (`Algorithm.loss_weights`), so the loss and its gradient equal the
padded path's in every aggregation mode. Padding costs only the budget's slack.

Packing is first-fit decreasing (by length, ties by row order: deterministic) over the
rows one batch shard holds in one micro-batch, into P / S (Pt / S) rows of each layout
(S = the data x fsdp mesh size): every device packs its own rows, no row moves between
devices, and on many processes each process packs only its rows. It runs inside the
jitted update (a `lax.scan` over the rows, a handful of scatters), once per step.

The budgets are static (they fix shapes). A micro-batch that does not fit is not trained
on: the step skips the update (parameters, optimizer and teacher unchanged) and reports
`train/packed_overflow_rows`; the loop then stops with an error naming the knob and the
budget this batch needed (`train/packed_tokens_needed`,
`train/packed_teacher_tokens_needed`, reported every step). `propose_budgets` picks both
from observed lengths: the quantile of the rows first-fit decreasing needs over
resampled micro-batches.

Only the distillation algorithms (mopd, sdpo, opd) read packed rows
(`Algorithm.supports_packing`); the others stop at start-up with a ConfigError.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mopd_jax.choices import ConfigError

KNOB = "config.optim.packed_tokens"
TEACHER_KNOB = "config.optim.packed_teacher_tokens"


@flax.struct.dataclass
class PackedRows:
  """One micro-batch packed (or, with a leading [num] axis, all of a step's).

  Flat indices count within one batch shard's packed rows: `student_index` points into
  that shard's student hidden states [P / S * Ls], `teacher_index` into [Pt / S * Lt].
  """

  student_tokens: jax.Array  # int32 [P, Ls]
  student_segments: jax.Array  # int32 [P, Ls], 0 = padding
  student_positions: jax.Array  # int32 [P, Ls], restarting at 0 per segment
  teacher_tokens: jax.Array  # int32 [Pt, Lt]
  teacher_segments: jax.Array  # int32 [Pt, Lt]
  teacher_positions: jax.Array  # int32 [Pt, Lt]
  student_index: jax.Array  # int32 [P, Lr], hidden state predicting each loss slot
  teacher_index: jax.Array  # int32 [P, Lr]
  targets: jax.Array  # int32 [P, Lr], the response token of each loss slot
  weights: jax.Array  # float32 [P, Lr], its original row's weight (0 on padding)
  sampler_logp: jax.Array  # float32 [P, Lr]
  shards: int = flax.struct.field(pytree_node=False, default=1)


@flax.struct.dataclass
class PackedStep:
  """A step's packed micro-batches and how to read per-token results back."""

  rows: PackedRows  # each field [num, P, ...]
  unpack_index: jax.Array  # int32 [num, S, m / S, Lr], loss slot of each response token
  unpack_valid: jax.Array  # bool [num, S, m / S, Lr]
  overflow_rows: jax.Array  # int32 scalar: rows that did not fit (any layout)
  # Packed rows per micro-batch this batch needed: student and loss (P), teacher (Pt).
  rows_needed: jax.Array  # int32 scalar
  teacher_rows_needed: jax.Array  # int32 scalar
  fill: dict  # layout -> float32 scalar, real tokens / budget tokens


def packed_rows(packed_tokens: int, row_length: int, rows_per_micro_batch: int,
                shards: int, knob: str = KNOB) -> int:
  """The packed rows per micro-batch of a budget of `packed_tokens` (the value of `knob`)
  in rows of `row_length`; a ConfigError naming the knob when it is not a whole number of
  rows that splits over the batch shards or exceeds the padded rows it replaces."""
  step = row_length * shards
  if packed_tokens % step:
    below = packed_tokens // step * step
    raise ConfigError(
        f"Invalid {knob} = {packed_tokens}: the budget must be a whole number of rows "
        f"({row_length} tokens, the padded row) for each of the {shards} batch shard(s) "
        f"(data x fsdp), i.e. a multiple of {step}; nearest: "
        f"{[v for v in (below, below + step) if v > 0]}.")
  rows = packed_tokens // row_length
  if rows > rows_per_micro_batch:
    raise ConfigError(
        f"Invalid {knob} = {packed_tokens}: that is {rows} packed rows of {row_length} "
        f"tokens, more than the {rows_per_micro_batch} padded rows of a micro-batch "
        f"(config.optim.micro_batch_rows, or the whole batch); use at most "
        f"{rows_per_micro_batch * row_length}.")
  return rows


def first_fit_decreasing(lengths, capacity: int):
  """Places items of `lengths` int32 [n] (each <= capacity) into bins of `capacity`.

  Items go in order of decreasing length (ties: lower index first), each into the first
  bin with room; with n bins every item finds one, and the first b bins hold exactly
  what they would hold if only b existed (later bins never change earlier ones), so
  with a budget of b bins an item placed in bin >= b is one that does not fit.

  Returns (bin, offset, segment) int32 [n] -- segment = 1 + the item's rank within its
  bin, rising along the bin -- and the bins used (int32 scalar).
  """
  n = lengths.shape[0]
  lengths = lengths.astype(jnp.int32)
  order = jnp.argsort(-lengths, stable=True)

  def place(carry, item):
    free, count = carry
    length = lengths[item]
    b = jnp.argmax(free >= length).astype(jnp.int32)
    offset = capacity - free[b]
    count = count.at[b].add(1)
    return (free.at[b].add(-length), count), (b, offset, count[b])

  init = (jnp.full((n,), capacity, jnp.int32), jnp.zeros((n,), jnp.int32))
  _, placed = jax.lax.scan(place, init, order)
  bins, offsets, segments = (jnp.zeros((n,), jnp.int32).at[order].set(x) for x in placed)
  used = jnp.max(jnp.where(lengths > 0, bins + 1, 0))
  return bins, offsets, segments, used


def _layout(tokens, mask, bins, offsets, segments, num_bins, pad_id):
  """Scatters the real tokens of padded rows [n, L] into `num_bins` packed rows [b, L]
  at their bins and offsets, compacted (gaps of the padded row removed).

  Returns (tokens, segments, positions) [b, L] and the flat slot [n, L] of every padded
  slot (b * L, out of range, where it is padding or its row did not fit).
  """
  length = tokens.shape[1]
  position = jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1
  keep = mask & (bins < num_bins)[:, None]
  slot = jnp.where(keep, (bins * length + offsets)[:, None] + position, num_bins * length)
  size = num_bins * length

  def scatter(values, fill):
    out = jnp.full((size,), fill, values.dtype)
    return out.at[slot.reshape(-1)].set(values.reshape(-1), mode="drop").reshape(
        num_bins, length)

  seg = jnp.broadcast_to(segments[:, None], tokens.shape)
  return (scatter(tokens, pad_id), scatter(seg, 0), scatter(position, 0)), slot


def _pack_shard(student_tokens, student_mask, teacher_tokens, teacher_mask, responses,
                response_mask, weights, sampler_logp, *, prompt_len, teacher_prompt_len,
                num_bins, teacher_bins, pad_id):
  """Packs the n rows one shard holds in one micro-batch into `num_bins` rows of the
  student and loss layouts and `teacher_bins` rows of the teacher layout.

  student_* / teacher_*: [n, Lp + Lr] / [n, Ltp + Lr] padded sequences (prompt, then the
  response); responses, response_mask, weights, sampler_logp: [n, Lr].
  """
  n, lr = responses.shape
  ls, lt = student_tokens.shape[1], teacher_tokens.shape[1]
  s_len = student_mask.sum(1, dtype=jnp.int32)
  t_len = teacher_mask.sum(1, dtype=jnp.int32)
  r_len = response_mask.sum(1, dtype=jnp.int32)
  s_place = first_fit_decreasing(s_len, ls)
  t_place = first_fit_decreasing(t_len, lt)
  r_place = first_fit_decreasing(r_len, lr)
  student, s_slot = _layout(student_tokens, student_mask, *s_place[:3], num_bins, pad_id)
  teacher, t_slot = _layout(teacher_tokens, teacher_mask, *t_place[:3], teacher_bins,
                            pad_id)
  # Loss slots: response token t of row i; the hidden state predicting it is the padded
  # slot before it (the prompt's last token for t = 0), found through the slot maps.
  r_bins, r_offsets = r_place[:2]
  fits = r_bins < num_bins
  valid = response_mask & fits[:, None]
  loss_slot = (r_bins * lr + r_offsets)[:, None] + jnp.arange(lr)[None]
  loss_slot = jnp.where(valid, loss_slot, num_bins * lr)
  s_source = s_slot[:, prompt_len - 1:prompt_len - 1 + lr]
  t_source = t_slot[:, teacher_prompt_len - 1:teacher_prompt_len - 1 + lr]
  size = num_bins * lr

  def scatter(values, fill):
    out = jnp.full((size,), fill, values.dtype)
    return out.at[loss_slot.reshape(-1)].set(values.reshape(-1), mode="drop").reshape(
        num_bins, lr)

  # A source slot out of range (its row did not fit) points at 0: the step is skipped.
  s_source = jnp.where(s_source < num_bins * ls, s_source, 0)
  t_source = jnp.where(t_source < teacher_bins * lt, t_source, 0)
  rows = PackedRows(
      student_tokens=student[0], student_segments=student[1], student_positions=student[2],
      teacher_tokens=teacher[0], teacher_segments=teacher[1], teacher_positions=teacher[2],
      student_index=scatter(s_source, 0), teacher_index=scatter(t_source, 0),
      targets=scatter(responses, pad_id), weights=scatter(weights.astype(jnp.float32), 0.0),
      sampler_logp=scatter(sampler_logp.astype(jnp.float32), 0.0))
  overflow = ((s_place[0] >= num_bins) | (t_place[0] >= teacher_bins) | ~fits).sum()
  used = jnp.stack([jnp.maximum(s_place[3], r_place[3]), t_place[3]])
  real = jnp.stack([s_len.sum(), t_len.sum(), r_len.sum()])
  return rows, jnp.where(valid, loss_slot, 0), valid, overflow, used, real


def pack(rows_by_micro_batch, *, prompt_len: int, teacher_prompt_len: int,
         packed_tokens: int, packed_teacher_tokens: int = 0, shards: int,
         pad_id: int) -> PackedStep:
  """Packs a step's rows, already split into micro-batches.

  rows_by_micro_batch: dict of arrays [num, m, ...] (`train_step`'s strided micro-batches,
  whose m rows hold the shards' rows in contiguous blocks of m / S): student_tokens,
  student_mask [.., Lp + Lr]; teacher_tokens, teacher_mask [.., Ltp + Lr]; responses,
  response_mask, weights, sampler_logp [.., Lr]. packed_teacher_tokens 0: as many teacher
  rows as student rows.
  """
  x = rows_by_micro_batch
  num, m, ls = x["student_tokens"].shape
  lt, lr = x["teacher_tokens"].shape[2], x["responses"].shape[2]
  if m % shards:
    raise ConfigError(
        f"{KNOB} packs each batch shard's rows on its own, so the {m} rows of a "
        f"micro-batch must split over the {shards} data x fsdp shards.")
  num_rows = packed_rows(packed_tokens, ls, m, shards)
  teacher_rows = (packed_rows(packed_teacher_tokens, lt, m, shards, TEACHER_KNOB)
                  if packed_teacher_tokens else num_rows)
  by_shard = {k: v.reshape(num, shards, m // shards, *v.shape[2:]) for k, v in x.items()}

  def one(d):
    return _pack_shard(d["student_tokens"], d["student_mask"], d["teacher_tokens"],
                       d["teacher_mask"], d["responses"], d["response_mask"], d["weights"],
                       d["sampler_logp"], prompt_len=prompt_len,
                       teacher_prompt_len=teacher_prompt_len, num_bins=num_rows // shards,
                       teacher_bins=teacher_rows // shards, pad_id=pad_id)

  rows, unpack_index, unpack_valid, overflow, used, real = jax.vmap(jax.vmap(one))(by_shard)
  # [num, S, bins, L] -> [num, P, L]: shard s holds packed rows s * bins ... (s+1) * bins.
  rows = jax.tree.map(lambda a: a.reshape(num, -1, *a.shape[3:]), rows)
  rows = rows.replace(shards=shards)
  capacity = jnp.asarray([ls * num_rows, lt * teacher_rows, lr * num_rows],
                         jnp.float32) * num
  fill = real.sum((0, 1)).astype(jnp.float32) / capacity
  used = used.max((0, 1)).astype(jnp.int32) * shards
  return PackedStep(rows=rows, unpack_index=unpack_index, unpack_valid=unpack_valid,
                    overflow_rows=overflow.sum().astype(jnp.int32), rows_needed=used[0],
                    teacher_rows_needed=used[1],
                    fill={"student": fill[0], "teacher": fill[1], "loss": fill[2]})


def by_shard(x, shards: int):
  """[P, L, ...] -> [S, P / S * L, ...]: each shard's packed rows flattened (a reshape
  that keeps the rows' split over the batch axes)."""
  return x.reshape(shards, -1, *x.shape[2:])


def gather_hidden(hidden, index, shards: int):
  """Hidden states of packed rows [P, L, D] at the loss layout's flat indices [P, Lr],
  within each shard: [P, Lr, D]. A gather batched over shards, so it stays on device."""
  p, lr = index.shape
  flat = by_shard(hidden, shards)  # [S, P / S * L, D]
  idx = by_shard(index, shards)  # [S, P / S * Lr]
  out = jax.vmap(lambda h, i: jnp.take(h, i, axis=0))(flat, idx)
  return out.reshape(p, lr, hidden.shape[-1])


def unpack(values, packed: PackedStep):
  """Per-token values of the loss layout [num, P, Lr] -> [num, m, Lr] in each
  micro-batch's row order (0 where a token had no slot)."""
  num, p, lr = values.shape
  shards = packed.rows.shards
  flat = values.reshape(num, shards, (p // shards) * lr)
  out = jax.vmap(jax.vmap(lambda v, i: jnp.take(v, i.reshape(-1)).reshape(i.shape)))(
      flat, packed.unpack_index)
  out = jnp.where(packed.unpack_valid, out, jnp.zeros((), out.dtype))
  return out.reshape(num, -1, lr)


def overflow_message(needed: dict, budgets: dict, step: int | None = None) -> str:
  """The error of a batch that did not fit its budgets: `needed` and `budgets` map each
  knob to the tokens this batch needed and to its value."""
  at = "" if step is None else f" of step {step}"
  short = [f"{k} = {budgets[k]} (needed >= {v})" for k, v in needed.items()
           if v > budgets[k]]
  return (f"The batch{at} did not fit its packed budget: {', '.join(short)}. The update "
          "was skipped; raise the budget (mopd_jax.packing.propose_budgets picks one from "
          "observed lengths) or set config.optim.packed_tokens to 0 for padded rows.")


# ------------------------------------------------------------------ Choosing a budget.

def first_fit_decreasing_np(lengths, capacity: int) -> np.ndarray:
  """Host first-fit decreasing: the bin of each item (bins unlimited), as on device."""
  lengths = np.asarray(lengths, np.int64)
  if (lengths > capacity).any():
    raise ValueError(f"an item of length {lengths.max()} exceeds the capacity {capacity}")
  free, bins = [], np.zeros(len(lengths), np.int64)
  for item in np.argsort(-lengths, kind="stable"):
    for b, room in enumerate(free):
      if room >= lengths[item]:
        break
    else:
      b = len(free)
      free.append(capacity)
    free[b] -= lengths[item]
    bins[item] = b
  return bins


def rows_needed_np(lengths, capacity: int) -> int:
  bins = first_fit_decreasing_np(lengths, capacity)
  used = bins[np.asarray(lengths) > 0]
  return int(used.max()) + 1 if used.size else 0


def propose_budgets(student_lengths, teacher_lengths, response_lengths, *,
                    student_row: int, teacher_row: int, response_row: int,
                    micro_batch_rows: int, shards: int = 1, quantile: float = 0.99,
                    draws: int = 200, seed: int = 0) -> tuple[int, int]:
  """(`optim.packed_tokens`, `optim.packed_teacher_tokens`) chosen from data: observed
  rows' real lengths of the student sequence (prompt + response), the teacher sequence
  (teacher prompt + response) and the response, int [n] each (e.g. from a padded run's
  first steps).

  Draws `draws` micro-batches of `micro_batch_rows` rows at random (seeded), packs each
  shard's part with first-fit decreasing into rows of `student_row` / `teacher_row` /
  `response_row` tokens (the padded lengths), and takes the `quantile` of the rows a
  micro-batch needed (student and loss layouts together; teacher), in whole rows per
  shard and at most the padded micro-batch.
  """
  lengths = [np.asarray(x, np.int64) for x in (student_lengths, teacher_lengths,
                                               response_lengths)]
  n = len(lengths[0])
  if any(len(x) != n for x in lengths) or n == 0:
    raise ValueError(f"the three length arrays must be non-empty and of one size, got "
                     f"{[len(x) for x in lengths]}")
  if micro_batch_rows % shards:
    raise ValueError(f"micro_batch_rows = {micro_batch_rows} must split over {shards} "
                     "shards")
  if not 0 < quantile <= 1:
    raise ValueError(f"quantile must be in (0, 1], got {quantile!r}")
  rng = np.random.default_rng(seed)
  caps = (student_row, teacher_row, response_row)
  needed = []
  for _ in range(draws):
    rows = rng.choice(n, size=micro_batch_rows, replace=n < micro_batch_rows)
    per_part = [[rows_needed_np(x[part], cap) for x, cap in zip(lengths, caps)]
                for part in np.split(rows, shards)]
    needed.append((max(max(p[0], p[2]) for p in per_part), max(p[1] for p in per_part)))

  def rows_at_quantile(values):
    per_shard = int(np.quantile(values, quantile, method="higher"))
    return min(max(per_shard, 1), micro_batch_rows // shards) * shards

  student, teacher = zip(*needed)
  return (rows_at_quantile(student) * student_row, rows_at_quantile(teacher) * teacher_row)
