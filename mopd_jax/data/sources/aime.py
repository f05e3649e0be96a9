"""Competition evaluation sets: AIME 2024 / 2025, HMMT 2025 (JSONL, JSON list or parquet).

The problem text is in `problem` or `question` (`Problem` in some exports), the answer in
`answer` (`Answer`); an `id` / `ID` / `problem_idx` column gives the id, else the row
position does. Ids are `<file stem>/<id>`. Reference: {"answer": answer} (`verifiers.math`).
"""

from __future__ import annotations

import os

from mopd_jax.data.sources import common, instructions

_TEXT = ("problem", "question", "Problem", "Question")
_ANSWER = ("answer", "Answer")
_ID = ("id", "ID", "problem_idx")


def _problem(row, stem: str, position) -> common.Problem:
  question = common.first_field(row, _TEXT)
  answer = common.answer_text(common.first_field(row, _ANSWER, (str, int, float)), "answer")
  source_id = next((row[k] for k in _ID if row.get(k) is not None), position)
  return common.Problem(f"{stem}/{source_id}", "math", instructions.math(question),
                        {"answer": answer}, {"source": stem})


def load(path: str, rows: common.Rows) -> list[str]:
  """Reads the evaluation file(s) at `path` into `rows`; returns the files read."""
  paths = common.files(path, ("*.jsonl", "*.json", "*.parquet"), "AIME/HMMT")
  for file in paths:
    stem = os.path.splitext(os.path.basename(file))[0]
    for where, row in common.records(file, rows, paths, _TEXT + _ANSWER + _ID):
      position = where if isinstance(where, int) else where.rsplit(":", 1)[1]
      rows.add(where, _problem, row, stem, position)
  return paths
