"""The bridge between the jitted step and host-side verifiers.

Device side (`verify_on_device`): inside `shard_map`, each device hands only its own
rows (split over ('data', 'fsdp')) to the host through `io_callback`. Devices along the
'tensor' axis hold the same rows; only tensor index 0 calls the host and a `psum` over
'tensor' gives the result to the others, so no row is verified twice.

Host side (`HostVerifier`): receives example ids, response tokens and lengths as numpy
arrays, decodes the text, looks the example's reference up in a host table, scores the
batch and returns fixed-shape numpy arrays. It never calls JAX and never raises: a
failure of the verifier gives reward 0 with status ERROR and is counted in the metrics.

Feedback length (MOPD spec section 2): the authors show at most `FEEDBACK_MAX_CHARS`
characters of a rollout's feedback, and the teacher prompt's token cap is the only other
limit. Here the feedback text is cut to those characters before tokenisation, and its
tokens go to a fixed-shape buffer of `feedback_len` tokens, the room the teacher prompt
reserves for it. A feedback with more tokens than that is cut at the buffer, counted
(`HostVerifier.feedback_cut_rows`, over the run: the summary's `feedback_cut_rows`) and
logged (once per run), never silently. A byte-level BPE
makes at most one token of each ASCII character, so a buffer of `FEEDBACK_MAX_CHARS`
tokens cuts only feedback with many multi-byte characters.

Duplicates (`dedupe`, config.verifier.dedupe): rollouts of one prompt are often identical
(42% of the demo base model's first rows; more as the student sharpens). Identical
responses to the same example in one call are verified once and share that result
(reward, status, feedback); the rows are counted (`HostVerifier.duplicate_rows`). This is
exact for a verifier whose result is a function of the response; a verifier with random
results should set dedupe off.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback
from jax.sharding import PartitionSpec as P

from mopd_jax import sharding
from mopd_jax.verifiers.result import Result

# Status codes returned per row.
STATUS_CODES = {"ok": 0, "format_error": 1, "timeout": 2, "error": 3}

# The authors' preview limit of verifier feedback, in characters.
FEEDBACK_MAX_CHARS = 2000

_SUMMARY_OPEN, _SUMMARY_CLOSE = "<summary>", "</summary>"
# Decoded batches kept for the other of the two host callables (see `HostVerifier`).
_MAX_SHARED_BATCHES = 16


def extract_summary(text: str, fallback_chars: int) -> tuple[str, bool]:
  """The response's summary, as the authors take it (MOPD spec section 2).

  (text, True) for the first complete `<summary>...</summary>`: the text between the
  first `<summary>` and the first `</summary>` after it, stripped. A response without a
  complete one (no tag, or an unterminated tag) gives (its first `fallback_chars`
  characters, False).
  """
  start = text.find(_SUMMARY_OPEN)
  if start >= 0:
    body = text[start + len(_SUMMARY_OPEN):]
    end = body.find(_SUMMARY_CLOSE)
    if end >= 0:
      return body[:end].strip(), True
  return text[:fallback_chars], False


class HostVerifier:
  """Callable (ids [n], tokens [n, Lr], lengths [n]) -> fixed-shape numpy arrays.

  Returns (rewards float32 [n], status int32 [n], feedback int32 [n, feedback_len],
  feedback_lengths int32 [n]). The feedback is the first `FEEDBACK_MAX_CHARS` characters
  of the verifier's, tokenised; one with more than `feedback_len` tokens keeps the first
  `feedback_len` and is counted (see the module docstring). `summarize` is the summaries
  variant's second callable.

  With `share_texts` (the summaries variant), the step hands the same responses to both
  callables, in either order or at once: whichever decodes a batch first keeps the texts
  (keyed by a hash of the tokens and lengths; at most a few batches) for the other, so
  each response is decoded once.
  """

  def __init__(
      self,
      score_batch: Callable[[Sequence[str], Sequence], list[Result]],
      references: Mapping[int, object],
      tokenizer,
      feedback_len: int,
      summary_len: int = 1,
      summary_fallback_chars: int = 300,
      share_texts: bool = False,
      dedupe: bool = True,
  ):
    self.score_batch = score_batch
    self.references = references
    self.tokenizer = tokenizer
    self.feedback_len = feedback_len
    self.summary_len = summary_len
    self.summary_fallback_chars = summary_fallback_chars
    self.calls = 0  # calls and rows verified on this process, over the whole run
    self.rows = 0
    self.feedback_cut_rows = 0  # feedback cut at `feedback_len` tokens, over the whole run
    # Host-side statistics since the last `pop_timing` (calls may come from several
    # threads).
    self._lock = threading.Lock()
    self._seconds = 0.0
    self._rows = 0
    self._share_texts = share_texts
    self._shared: dict[bytes, list[str]] = {}
    self.decoded_rows = 0  # responses decoded on this process, over the whole run
    self.dedupe = dedupe
    # Rows that shared the result of an identical response (same example, same text) in
    # their call instead of being verified again, over the whole run.
    self.duplicate_rows = 0

  def pop_timing(self) -> dict:
    """Host-side timing of this process since the last call: wall time spent in the
    host callables (verifying, and extracting summaries), total and per verified
    response. (The loop reads a step's metrics after launching the next step, whose
    callback may already have run: only timings, never counts that must be exact, are
    attributed this way; see `feedback_cut_rows` for the run's count of cut feedback.)"""
    with self._lock:
      seconds, rows = self._seconds, self._rows
      self._seconds, self._rows = 0.0, 0
    return {"verify/host_time_s": seconds,
            "verify/mean_time_s": seconds / rows if rows else 0.0}

  def _feedback_tokens(self, text: str, rows: int = 1) -> list[int]:
    """The feedback's first `FEEDBACK_MAX_CHARS` characters, tokenised, at most
    `feedback_len` tokens (a cut is counted for each of the `rows` that show it, and
    logged the first time)."""
    ids = self.tokenizer.encode(text[:FEEDBACK_MAX_CHARS])
    if len(ids) <= self.feedback_len:
      return ids
    with self._lock:
      first = self.feedback_cut_rows == 0
      self.feedback_cut_rows += rows
    if first:
      logging.warning(
          "Verifier feedback of %d tokens cut to config.peers.feedback_len = %d tokens; "
          "raise it to show the whole feedback (at most %d characters). Cuts are counted "
          "in the summary's feedback_cut_rows.", len(ids), self.feedback_len,
          FEEDBACK_MAX_CHARS)
    return ids[:self.feedback_len]

  def texts(self, tokens, lengths) -> list[str]:
    with self._lock:
      self.decoded_rows += len(tokens)
    return [self.tokenizer.decode(row[:n]) for row, n in zip(tokens, lengths)]

  def _decoded(self, tokens, lengths) -> list[str]:
    """`texts`, or the texts the other callable already decoded from the same arrays."""
    if not self._share_texts:
      return self.texts(tokens, lengths)
    key = hashlib.blake2b(
        str(tokens.shape).encode() + tokens.tobytes() + lengths.tobytes(),
        digest_size=16).digest()
    with self._lock:
      texts = self._shared.pop(key, None)
    if texts is not None:
      return texts
    texts = self.texts(tokens, lengths)
    with self._lock:
      while len(self._shared) >= _MAX_SHARED_BATCHES:  # a batch the other never claimed
        self._shared.pop(next(iter(self._shared)))
      self._shared[key] = texts
    return texts

  def __call__(self, ids, tokens, lengths):
    start = time.perf_counter()
    n = len(ids)
    self.calls += 1
    self.rows += n
    rewards = np.zeros((n,), np.float32)
    status = np.full((n,), STATUS_CODES["error"], np.int32)
    # feedback_len 0 (feedback never shown): one empty column, the device's fixed shape.
    feedback = np.zeros((n, max(self.feedback_len, 1)), np.int32)
    feedback_lengths = np.zeros((n,), np.int32)
    try:
      ids, tokens, lengths = np.asarray(ids), np.asarray(tokens), np.asarray(lengths)
      texts = self._decoded(tokens, lengths)
      unique, copies = self._unique_rows(ids, texts)
      results = self.score_batch([texts[r] for r in unique],
                                 [self.references[int(ids[r])] for r in unique])
      if len(results) != len(unique):
        raise ValueError(f"The verifier returned {len(results)} results for "
                         f"{len(unique)} responses.")
      for row, res, rows in zip(unique, results, copies):
        rewards[rows] = np.clip(np.float32(res.reward), 0.0, 1.0)
        status[rows] = STATUS_CODES.get(res.status, STATUS_CODES["error"])
        if self.feedback_len and res.feedback:
          fb = self._feedback_tokens(res.feedback, rows=len(rows))
          feedback[rows, : len(fb)] = fb
          feedback_lengths[rows] = len(fb)
    except Exception:  # pylint: disable=broad-except
      # Nothing a model output can cause may crash the trainer: score 0, count it.
      logging.exception("Verifier failed on a batch of %d rows; scoring them 0.", n)
      rewards[:] = 0.0
      status[:] = STATUS_CODES["error"]
    with self._lock:
      self._seconds += time.perf_counter() - start
      self._rows += n
    return rewards, status, feedback, feedback_lengths

  def _unique_rows(self, ids, texts) -> tuple[list[int], list[list[int]]]:
    """(the first row of each distinct (example id, text), the rows of each): every row
    its own with `dedupe` off."""
    if not self.dedupe:
      return list(range(len(texts))), [[row] for row in range(len(texts))]
    first: dict[tuple[int, str], int] = {}
    copies: list[list[int]] = []
    for row, key in enumerate(zip(ids.tolist(), texts)):
      if key not in first:
        first[key] = len(copies)
        copies.append([])
      copies[first[key]].append(row)
    with self._lock:
      self.duplicate_rows += len(texts) - len(copies)
    return [rows[0] for rows in copies], copies

  def summarize(self, tokens, lengths):
    """Callable (tokens [n, Lr], lengths [n]) -> each response's summary (`extract_summary`).

    Returns (summaries int32 [n, summary_len] right-padded with 0, summary_lengths int32
    [n], missing int32 [n]: 1 where the response had no <summary> tag). Never raises: on
    a failure every row gets an empty summary and counts as missing.
    """
    start = time.perf_counter()
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    n = tokens.shape[0]
    summaries = np.zeros((n, self.summary_len), np.int32)
    summary_lengths = np.zeros((n,), np.int32)
    missing = np.ones((n,), np.int32)
    try:
      for row, text in enumerate(self._decoded(tokens, lengths)):
        summary, found = extract_summary(text, self.summary_fallback_chars)
        ids = self.tokenizer.encode(summary)[: self.summary_len]
        summaries[row, : len(ids)] = ids
        summary_lengths[row] = len(ids)
        missing[row] = int(not found)
    except Exception:  # pylint: disable=broad-except
      logging.exception("Summary extraction failed on a batch of %d rows.", n)
      summaries[:] = 0
      summary_lengths[:] = 0
      missing[:] = 1
    with self._lock:
      self._seconds += time.perf_counter() - start
    return summaries, summary_lengths, missing


def verify_on_device(mesh, host_fn, ids, tokens, lengths, *, feedback_len: int):
  """Calls `host_fn` once per distinct shard of rows; see the module docstring.

  ids int32 [N], tokens int32 [N, Lr], lengths int32 [N] (split over data x fsdp).
  Returns rewards float32 [N], status int32 [N], feedback int32 [N, Lf], lengths [N].
  """
  def shapes(n):
    return ((n,), jnp.float32), ((n,), jnp.int32), ((n, feedback_len), jnp.int32), (
        (n,), jnp.int32)

  return _rows_on_host(mesh, host_fn, shapes, ids, tokens, lengths)


def summarize_on_device(mesh, summarize_fn, tokens, lengths, *, summary_len: int):
  """`HostVerifier.summarize` per distinct shard of rows, like `verify_on_device`.

  tokens int32 [N, Lr], lengths int32 [N]. Returns summaries int32 [N, summary_len],
  summary_lengths int32 [N], missing int32 [N].
  """
  def shapes(n):
    return ((n, summary_len), jnp.int32), ((n,), jnp.int32), ((n,), jnp.int32)

  return _rows_on_host(mesh, summarize_fn, shapes, tokens, lengths)


def _rows_on_host(mesh, host_fn, out_shapes, *args):
  """Runs `host_fn(*args)` on each device's rows; every arg and output is split on its
  first axis over ('data', 'fsdp'). out_shapes(n) -> ((shape, dtype), ...) of n rows.

  The callback hands every output back as a matrix [n, width] (reshaped on both sides):
  on TPU under the Shardy partitioner, JAX lowers each result to its own host `recv`
  and gives every one the sharding of the first result, so results of different ranks
  (rewards [n] next to feedback [n, Lf]) would not lower.
  """

  def as_matrices(*host_args):
    return tuple(np.asarray(x).reshape(len(x), -1) for x in host_fn(*host_args))

  def per_device(*args):
    n = args[0].shape[0]
    shapes = tuple(jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in out_shapes(n))
    matrices = tuple(jax.ShapeDtypeStruct((n, math.prod(s.shape[1:])), s.dtype)
                     for s in shapes)

    def call(_):
      out = io_callback(as_matrices, matrices, *args, ordered=False)
      return tuple(x.reshape(s.shape) for x, s in zip(out, shapes))

    def skip(_):
      return tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)

    first = jax.lax.axis_index("tensor") == 0
    out = jax.lax.cond(first, call, skip, None)
    return tuple(jax.lax.psum(x, "tensor") for x in out)

  def spec(ndim):
    return P(sharding.BATCH_AXES, *([None] * (ndim - 1)))

  fn = jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=tuple(spec(a.ndim) for a in args),
      out_specs=tuple(spec(len(shape)) for shape, _ in out_shapes(1)),
      check_vma=False,
  )
  return fn(*args)
