"""Tokenised prompts on disk: written by the seqio data layer, read with numpy only.

Accelerator hosts without TensorFlow train from this file. One `.npz` per split:
  example_id  int64 [N]        id of the example (key of the host reference table)
  tokens      int32 [T]        all prompts' chat-formatted token ids, concatenated
  offsets     int64 [N + 1]    prompt i is tokens[offsets[i]:offsets[i+1]]
  insert      int32 [N]        insertion index of the peer context within prompt i
  references  str   [N]        JSON reference of example i (tests, answer, ...)
  sources     str   [N]        source of example i: the name its evaluation metrics carry
  meta        str   []         JSON: task, split, vocabulary fingerprint

A file written before `sources` existed reads as one source named by its task (`FORMAT`
is part of the real-data tasks' cache names, so theirs are rebuilt instead).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import numpy as np

from mopd_jax import tokenizers

# Version of the file layout above; part of the real-data caches' names (`pipeline`).
FORMAT = 2


def default_source(meta: dict) -> str:
  """The one source of a split whose examples carry none: its task without "mopd_"."""
  return str(meta.get("task", "unknown")).removeprefix("mopd_")


@dataclasses.dataclass
class TokenizedSplit:
  example_id: np.ndarray
  prompts: list  # list of int32 arrays (chat-formatted prompt ids)
  insert_index: np.ndarray
  references: list  # list of JSON strings
  meta: dict
  sources: list | None = None  # per-example source names; None: one, `default_source(meta)`

  def __len__(self):
    return len(self.prompts)

  def reference_table(self) -> dict:
    """example id -> decoded reference (host side)."""
    return {int(i): json.loads(r) for i, r in zip(self.example_id, self.references)}

  def source_names(self) -> list:
    """The source name of each example, in order."""
    if self.sources is None:
      return [default_source(self.meta)] * len(self)
    return [str(s) for s in self.sources]

  def source_table(self) -> dict:
    """example id -> source name (host side; names the per-source evaluation metrics)."""
    return dict(zip((int(i) for i in self.example_id), self.source_names()))


def tokenize_examples(examples, tokenizer, meta: dict) -> TokenizedSplit:
  """A split from text examples {"example_id", "inputs", "reference", "system", "source"}
  (numpy only; without "source" an example belongs to the split's one default source).

  Each prompt is rendered with `tokenizers.encode_chat_prompt` (the tokenizer's chat
  template, or the plain chat format), which also gives the peer-context insertion index.
  A non-empty "system" text is the chat template's system message; the plain chat format
  has none, so there it opens the user text, followed by a blank line.
  """
  templated = bool(getattr(tokenizer, "chat_templates", None))
  ids, prompts, inserts, refs, names = [], [], [], [], []
  for example in examples:
    system, text = example.get("system") or "", example["inputs"]
    if system and templated:
      tokens, insert = tokenizers.encode_chat_prompt(tokenizer, text, system=system)
    else:
      text = f"{system}\n\n{text}" if system else text
      tokens, insert = tokenizers.encode_chat_prompt(tokenizer, text)
    ids.append(int(example["example_id"]))
    prompts.append(np.asarray(tokens, np.int32))
    inserts.append(insert)
    refs.append(example["reference"])
    names.append(example.get("source") or default_source(meta))
  return TokenizedSplit(example_id=np.asarray(ids, np.int64), prompts=prompts,
                        insert_index=np.asarray(inserts, np.int32), references=refs,
                        meta={**meta, "vocab_size": tokenizer.vocab_size}, sources=names)


def write(path: str, split: TokenizedSplit):
  """Atomically writes `split` to `path` (.npz)."""
  lengths = np.asarray([len(p) for p in split.prompts], np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)])
  tokens = (np.concatenate(split.prompts).astype(np.int32) if split.prompts
            else np.zeros((0,), np.int32))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".npz")
  os.close(fd)
  np.savez(tmp, example_id=np.asarray(split.example_id, np.int64), tokens=tokens,
           offsets=offsets, insert=np.asarray(split.insert_index, np.int32),
           references=np.asarray(split.references, dtype=str),
           sources=np.asarray(split.source_names(), dtype=str),
           meta=np.asarray(json.dumps(split.meta)))
  os.replace(tmp, path)


def read(path: str) -> TokenizedSplit:
  if not os.path.exists(path):
    raise FileNotFoundError(f"Tokenised data cache {path!r} does not exist.")
  with np.load(path, allow_pickle=False) as f:
    offsets, tokens = f["offsets"], f["tokens"]
    prompts = [tokens[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    return TokenizedSplit(example_id=f["example_id"], prompts=prompts,
                          insert_index=f["insert"], references=[str(r) for r in
                                                                f["references"]],
                          meta=json.loads(str(f["meta"])),
                          sources=([str(s) for s in f["sources"]] if "sources" in f.files
                                   else None))
