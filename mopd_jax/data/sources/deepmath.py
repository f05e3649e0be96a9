r"""DeepMath-103K: parquet shards (or a JSONL export) with `question` and `final_answer`.

The shards also hold `difficulty`, `topic` and three long `r1_solution_*` columns; only the
columns needed are read. Reference: {"answer": final_answer} (`verifiers.math`). Ids are
`deepmath/<file stem>/<row>` (0-based row index in parquet, 1-based line in JSONL).
"""

from __future__ import annotations

import os

from mopd_jax.data.sources import common, instructions

_COLUMNS = ("question", "final_answer", "difficulty", "topic")


def _problem(row, problem_id: str) -> common.Problem:
  question = common.field(row, "question")
  answer = common.answer_text(common.field(row, "final_answer", (str, int, float)),
                              "final_answer")
  meta = {key: row.get(key) for key in ("difficulty", "topic")}
  return common.Problem(problem_id, "math", instructions.math(question), {"answer": answer},
                        meta)


def load(path: str, rows: common.Rows) -> list[str]:
  """Reads DeepMath parquet / JSONL files at `path` into `rows`; returns the files read."""
  paths = common.files(path, ("*.parquet", "*.jsonl"), "DeepMath")
  for file in paths:
    stem = os.path.splitext(os.path.basename(file))[0]
    for where, row in common.records(file, rows, paths, _COLUMNS):
      position = where if isinstance(where, int) else where.rsplit(":", 1)[1]
      rows.add(where, _problem, row, f"deepmath/{stem}/{position}")
  return paths
