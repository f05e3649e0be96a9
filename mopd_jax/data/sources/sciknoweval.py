"""SciKnowEval: JSONL per domain with `question`, `choices` {text, label}, `answerKey`.

The level is `level` or `details.level` ("L1" ... "L5"). Reference: the gold letter
(`verifiers.choice`). Ids: the row's `id` if it has one, else `<file stem>/<line>`.

Options (defaults are the paper's selection):
  level: "L3"; None keeps every level.
  num_choices: (2, 4): the allowed numbers of options; None allows any.
  split: None (everything kept), "train" or "test": a 90/10 split of the kept problems,
    in file order, by a permutation from numpy's default_rng(split_seed); the first
    `train_fraction` (rounded down) is "train".
  split_seed: 42.  train_fraction: 0.9.
"""

from __future__ import annotations

import os

import numpy as np

from mopd_jax.data.sources import common, instructions


def _level(row) -> str | None:
  level = row.get("level")
  details = row.get("details")
  if level is None and isinstance(details, dict):
    level = details.get("level")
  return level


def _problem(row, default_id: str, level: str | None, num_choices) -> common.Problem | None:
  question = common.field(row, "question")
  choices = common.field(row, "choices", dict)
  texts, labels = choices.get("text"), choices.get("label")
  if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
    raise common.BadRow("choices", "needs 'text' and 'label' lists of equal length")
  if not texts or not all(isinstance(x, str) for x in texts + labels):
    raise common.BadRow("choices", "needs non-empty lists of strings")
  if not all(len(l) == 1 and l.isascii() and l.isalpha() for l in labels):
    raise common.BadRow("choices", f"labels must be single letters, got {labels}")
  answer = common.field(row, "answerKey").strip()
  if not (len(answer) == 1 and answer.isascii() and answer.isalpha()):
    raise common.BadRow("answerKey", f"not a letter: {answer!r}")
  if answer.upper() not in [l.upper() for l in labels]:
    raise common.BadRow("answerKey", f"{answer!r} is not one of the labels {labels}")
  row_level = _level(row)
  if level is not None and row_level != level:
    return None
  if num_choices is not None and len(labels) not in num_choices:
    return None
  problem_id = str(row["id"]) if row.get("id") is not None else default_id
  prompt = instructions.choice(question, list(zip(labels, texts)))
  meta = {"level": row_level, "domain": row.get("domain"), "type": row.get("type")}
  return common.Problem(problem_id, "choice", prompt, answer.upper(), meta)


def load(path: str, rows: common.Rows, *, level: str | None = "L3",
         num_choices=(2, 4), split: str | None = None, split_seed: int = 42,
         train_fraction: float = 0.9) -> list[str]:
  """Reads SciKnowEval JSONL at `path` into `rows`; returns the files read."""
  if split not in (None, "train", "test"):
    raise ValueError(f"split must be None, 'train' or 'test', got {split!r}.")
  if not 0 < train_fraction < 1:
    raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}.")
  num_choices = None if num_choices is None else tuple(num_choices)
  paths = common.files(path, ("*.jsonl",), "SciKnowEval")
  for file in paths:
    stem = os.path.splitext(os.path.basename(file))[0]
    for where, row in common.jsonl_rows(file, rows, paths):
      line = where if isinstance(where, int) else where.rsplit(":", 1)[1]
      rows.add(where, _problem, row, f"{stem}/{line}", level, num_choices)
  if split is not None:
    order = np.random.default_rng(split_seed).permutation(len(rows.problems))
    cut = int(len(order) * train_fraction)
    rows.keep(order[:cut] if split == "train" else order[cut:])
  return paths
