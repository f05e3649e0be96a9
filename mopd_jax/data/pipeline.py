"""Prompt batches served from memory in an order that depends only on (seed, step).

`PromptBatches.batch(step)` returns the batch the run sees at `step`, however the run
got there: a resumed run restores `step` and sees exactly the batches it would have
seen. Rows are left-padded to `max_prompt_len` (pad id on the left, mask False there).
A prompt longer than `max_prompt_len` is, with `overlong="filter"`, excluded (logged with
its example id and counted in `report["too_long"]`); with `overlong="truncate"` it loses
the middle of the part before the peer-context insertion index (its head, which holds the
chat template's opening and the start of the problem, and its tail, which holds the
answer-format instruction, are kept; the end of turn and generation prompt after the
insertion index always survive) and is counted in `report["truncated"]`. Never dropped
silently.

`load_split` reads (or builds) the demo task's cache; `load_source_splits` those of a
real-data task (`data.task` != "demo_code"), built through its seqio task.

On many processes each process pads only its block of rows (`rows=` a slice of the
global batch, see `sharding.process_rows`): the global order is computed (a permutation
of row indices, cheap), the prompts are padded only for the rows this process holds.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from mopd_jax import tokenizers
from mopd_jax.data import cache, demo_problems, source_splits


def left_pad(prompts, insert_index, max_len: int, pad_id: int):
  """(tokens int32 [B, max_len], mask bool [B, max_len], insert int32 [B])."""
  b = len(prompts)
  tokens = np.full((b, max_len), pad_id, np.int32)
  mask = np.zeros((b, max_len), bool)
  for row, p in enumerate(prompts):
    tokens[row, max_len - len(p):] = p
    mask[row, max_len - len(p):] = True
  return tokens, mask, np.asarray(insert_index, np.int32)


def truncate_middle(prompt: np.ndarray, insert: int, max_len: int):
  """(prompt cut to `max_len` tokens, new insertion index); None if it cannot fit.

  The tokens after `insert` are kept whole; of those before it, the first half and the
  last half of the remaining budget are kept.
  """
  tail = len(prompt) - insert
  budget = max_len - tail
  if budget < 2:
    return None
  head = (budget + 1) // 2
  kept = np.concatenate([prompt[:head], prompt[insert - (budget - head):insert], prompt[insert:]])
  return kept.astype(np.int32), budget


class PromptBatches:
  """Deterministic batches of `batch_size` prompts from a tokenised split."""

  def __init__(self, split: cache.TokenizedSplit, *, batch_size: int,
               max_prompt_len: int, seed: int, pad_id: int, overlong: str = "filter"):
    if overlong not in ("filter", "truncate"):
      raise ValueError(f"overlong must be 'filter' or 'truncate', got {overlong!r}.")
    self.prompts = list(split.prompts)
    self.insert_index = np.array(split.insert_index, np.int32)
    keep = np.ones(len(self.prompts), bool)
    truncated = 0
    for i, prompt in enumerate(self.prompts):
      if len(prompt) <= max_prompt_len:
        continue
      cut = (truncate_middle(prompt, int(self.insert_index[i]), max_prompt_len)
             if overlong == "truncate" else None)
      if cut is None:
        keep[i] = False
        logging.warning("Skipping example %d: prompt of %d tokens exceeds max_prompt_len=%d.",
                        int(split.example_id[i]), len(prompt), max_prompt_len)
      else:
        self.prompts[i], self.insert_index[i] = cut
        truncated += 1
    self.report = {"rows": len(self.prompts), "too_long": int((~keep).sum()),
                   "truncated": truncated}
    if truncated:
      logging.warning("Truncated %d prompts longer than max_prompt_len=%d.", truncated,
                      max_prompt_len)
    self._rows = np.flatnonzero(keep)
    if len(self._rows) < batch_size:
      raise ValueError(
          f"Only {len(self._rows)} usable prompts (of {len(keep)}; "
          f"{self.report['too_long']} longer than max_prompt_len={max_prompt_len}), "
          f"fewer than batch_size={batch_size}.")
    self.split, self.batch_size, self.seed = split, batch_size, seed
    self.max_prompt_len, self.pad_id = max_prompt_len, pad_id

  def indices(self, step: int) -> np.ndarray:
    """Row indices of the batch at `step`: epoch-wise permutations seeded by (seed, epoch)."""
    n, b = len(self._rows), self.batch_size
    start = step * b
    out = []
    while len(out) < b:
      epoch, offset = divmod(start + len(out), n)
      perm = np.random.default_rng([self.seed, epoch]).permutation(n)
      out.extend(perm[offset:offset + b - len(out)])
    return self._rows[np.asarray(out)]

  def batch(self, step: int, rows: slice = slice(None)) -> dict:
    """The batch at `step`, or its rows `rows` (this process's block)."""
    return self.rows(self.indices(step)[rows])

  def rows(self, idx) -> dict:
    tokens, mask, insert = left_pad([self.prompts[i] for i in idx], self.insert_index[idx],
                                    self.max_prompt_len, self.pad_id)
    return {"prompt_tokens": tokens, "prompt_mask": mask, "insert_index": insert,
            "example_id": self.split.example_id[idx].astype(np.int32)}

  def first(self, count: int, rows: slice = slice(None)) -> dict:
    """The first `count` usable rows in source order (fixed evaluation set), or their
    rows `rows`."""
    return self.rows(self._rows[:count][rows])


def tokenize_split(split: str, tokenizer) -> cache.TokenizedSplit:
  """The demo split tokenised directly with `tokenizer` (any chat template, no seqio).

  Used for Hugging Face tokenizers, whose chat templates are rendered by
  `tokenizers.encode_chat_prompt`; the SentencePiece demo goes through seqio instead.
  """
  ids, prompts, inserts, refs = [], [], [], []
  for i in demo_problems.problem_ids(split):
    problem = demo_problems.get_problem(int(i))
    tokens, insert = tokenizers.encode_chat_prompt(tokenizer, problem.prompt)
    ids.append(int(i))
    prompts.append(np.asarray(tokens, np.int32))
    inserts.append(insert)
    refs.append(json.dumps(problem.tests))
  return cache.TokenizedSplit(
      example_id=np.asarray(ids, np.int64), prompts=prompts,
      insert_index=np.asarray(inserts, np.int32), references=refs,
      meta={"task": "demo_code", "split": split, "vocab_size": tokenizer.vocab_size})


def load_split(cache_dir: str, split: str, spm_path, tokenizer):
  """Reads the tokenised cache of `split`, building it if it is missing.

  With a SentencePiece model (`spm_path`) the cache is built by the seqio task
  (TensorFlow is imported only then); without one, by `tokenize_split`.
  """
  path = os.path.join(cache_dir, f"{split}.npz")
  if not os.path.exists(path):
    if spm_path is None:
      cache.write(path, tokenize_split(split, tokenizer))
    else:
      from mopd_jax.data import seqio_tasks  # pylint: disable=import-outside-toplevel
      task = seqio_tasks.register_demo_task(spm_path)
      cache.write(path, seqio_tasks.tokenize_split(task, split, tokenizer))
  data = cache.read(path)
  if data.meta.get("vocab_size") != tokenizer.vocab_size:
    raise ValueError(
        f"Data cache {path!r} was written with vocab_size={data.meta.get('vocab_size')}, "
        f"but the tokenizer has {tokenizer.vocab_size}; delete the cache to rebuild it.")
  return data


def load_source_splits(cache_dir: str, data, tokenizer) -> dict:
  """{"train", "heldout"} tokenised splits of a real-data task, built if missing.

  `data` is the run's `settings.DataSettings`. Each split's cache file is named after the
  task, the split and a digest of its source, path, options, vocabulary size and the cache
  format, so a changed setting (or file layout) builds a new cache. Building reads the
  sources through the task's seqio task (TensorFlow is imported only then); the load
  report travels in the cache's meta.
  """
  specs = source_splits.split_specs(data)
  digest = {split: spec.fingerprint(data.task, tokenizer.vocab_size, cache.FORMAT)
            for split, spec in specs.items()}
  paths = {split: os.path.join(cache_dir, f"mopd_{data.task}_{split}_{digest[split]}.npz")
           for split in specs}
  if not all(os.path.exists(p) for p in paths.values()):
    from mopd_jax.data import seqio_tasks  # pylint: disable=import-outside-toplevel
    task = seqio_tasks.register_source_task(data.task, specs)
    for split, path in paths.items():
      cache.write(path, seqio_tasks.source_split(task, split, tokenizer))
  return {split: cache.read(path) for split, path in paths.items()}
