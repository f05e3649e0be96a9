"""The MOPD authors' processed schema: parquet rows {prompt, answer | tests, kind, dataset,
idx, description, system}.

`prompt` is the user message (a string, or a list of chat messages whose last user message
is taken) and already carries the authors' instruction, so it is used as is. `kind` names
the domain: "code", "math", "choice" (also "mcq", "science") or "tooluse" (also "tool").
References: code, `tests` (JSON text or object of {"inputs", "outputs", "fn_name"});
math, {"answer": answer}; choice, the answer letter; tool use, `answer` as JSON (the gold
calls). `system` goes into meta. Ids: `<dataset>/<idx>`. JSONL files of the same rows are
read as well.
"""

from __future__ import annotations

import json

from mopd_jax.data.sources import common

_COLUMNS = ("prompt", "answer", "tests", "kind", "dataset", "idx", "description", "system")
_DOMAINS = {"code": "code", "math": "math", "choice": "choice", "mcq": "choice",
            "science": "choice", "tooluse": "tooluse", "tool": "tooluse"}


def _prompt_text(row) -> str:
  prompt = row.get("prompt")
  if isinstance(prompt, list):
    users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    prompt = users[-1] if users else None
  if not isinstance(prompt, str) or not prompt.strip():
    raise common.BadRow("prompt", "needs a non-empty string or a chat with a user message")
  return prompt


def _json_value(value, name: str):
  if isinstance(value, str):
    try:
      return json.loads(value)
    except ValueError as exc:
      raise common.BadRow(name, f"not JSON: {value[:80]!r}") from exc
  return value


def _reference(row, domain: str):
  if domain == "code":
    tests = _json_value(common.field(row, "tests", (str, dict)), "tests")
    if not (isinstance(tests, dict) and isinstance(tests.get("inputs"), list)
            and isinstance(tests.get("outputs"), list) and tests["inputs"]
            and len(tests["inputs"]) == len(tests["outputs"])):
      raise common.BadRow("tests", "needs non-empty 'inputs' and 'outputs' lists of equal "
                          "length")
    return tests
  answer = common.field(row, "answer", (str, int, float, list, dict))
  if domain == "math":
    return {"answer": common.answer_text(answer, "answer")}
  if domain == "choice":
    letter = common.answer_text(answer, "answer").strip("() .")
    if not (len(letter) == 1 and letter.isascii() and letter.isalpha()):
      raise common.BadRow("answer", f"not a letter: {answer!r}")
    return letter.upper()
  gold = _json_value(answer, "answer")
  if not isinstance(gold, (list, dict)) or not gold:
    raise common.BadRow("answer", "tool-use answer must be a non-empty JSON list or object")
  return gold


def _problem(row) -> common.Problem:
  kind = common.field(row, "kind")
  if kind not in _DOMAINS:
    raise common.BadRow("kind", f"unknown kind {kind!r}; allowed: {sorted(_DOMAINS)}")
  domain = _DOMAINS[kind]
  dataset = common.field(row, "dataset")
  idx = common.field(row, "idx", (int, str))
  meta = {"dataset": dataset, "kind": kind, "description": row.get("description"),
          "system": row.get("system")}
  return common.Problem(f"{dataset}/{idx}", domain, _prompt_text(row), _reference(row, domain),
                        meta)


def load(path: str, rows: common.Rows) -> list[str]:
  """Reads the processed parquet (or JSONL) files at `path` into `rows`."""
  paths = common.files(path, ("*.parquet", "*.jsonl"), "MOPD processed")
  for file in paths:
    for where, row in common.records(file, rows, paths, _COLUMNS):
      rows.add(where, _problem, row)
  return paths
