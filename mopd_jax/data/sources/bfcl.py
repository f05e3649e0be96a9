"""BFCL single-call function calling, read out of the `bfcl-eval` wheel.

Questions are `bfcl_eval/data/BFCL_v*_<category>.json` (one JSON object a line: `id`,
`question` = turns of chat messages, `function` = JSON-schema function descriptions);
answers are `bfcl_eval/data/possible_answer/` files of the same name with
{"id", "ground_truth": [{function: {argument: [allowed values]}}]}, where an empty string
among the allowed values marks an optional argument. Reference: {"ground_truth": [...]}
(`verifiers.tooluse` grades it by allowed values). Ids: the BFCL ids.

Options: categories (("simple_python", "live_simple"): the single-call categories whose
arguments are Python values). `path` is the wheel or a directory holding it.
"""

from __future__ import annotations

import json
import re

from mopd_jax.data.sources import common, instructions, wheels

DISTRIBUTION = "bfcl_eval"
_DATA = "bfcl_eval/data/"


def _messages(question) -> tuple[str, str | None]:
  """(user text, system text or None) of a single-turn question."""
  if not (isinstance(question, list) and question and isinstance(question[0], list)):
    raise common.BadRow("question", "expected a list of turns of messages")
  if len(question) != 1:
    raise common.BadRow("question", f"{len(question)} turns; only single-turn items are read")
  users = [m.get("content") for m in question[0] if isinstance(m, dict) and m.get("role") == "user"]
  systems = [m.get("content") for m in question[0]
             if isinstance(m, dict) and m.get("role") == "system"]
  if not users or not all(isinstance(u, str) and u.strip() for u in users):
    raise common.BadRow("question", "no user message")
  return "\n".join(users), ("\n".join(s for s in systems if isinstance(s, str)) or None)


def _ground_truth(answer) -> list:
  gold = answer.get("ground_truth") if isinstance(answer, dict) else None
  if not isinstance(gold, list) or not gold:
    raise common.BadRow("ground_truth", "needs a non-empty list of calls")
  for call in gold:
    if not (isinstance(call, dict) and len(call) == 1
            and isinstance(next(iter(call.values())), dict)
            and all(isinstance(v, list) for v in next(iter(call.values())).values())):
      raise common.BadRow("ground_truth", f"a call is not {{name: {{arg: [allowed]}}}}: "
                          f"{json.dumps(call)[:80]}")
  return gold


def _problem(item, answers: dict, category: str) -> common.Problem:
  item_id = common.field(item, "id")
  if item_id not in answers:
    raise common.BadRow("id", f"no possible answer for {item_id!r}")
  user, system = _messages(item.get("question"))
  functions = common.field(item, "function", list)
  prompt = instructions.tooluse(user, instructions.json_schema_lines(functions))
  return common.Problem(item_id, "tooluse", prompt,
                        {"ground_truth": _ground_truth(answers[item_id])},
                        {"category": category, "system": system})


def _json_lines(data: bytes, name: str) -> list:
  try:
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
  except ValueError as exc:
    raise ValueError(f"{name} is not JSON lines: {exc}") from exc


def load(path: str, rows: common.Rows, *,
         categories=("simple_python", "live_simple")) -> list[str]:
  """Reads the BFCL `categories` out of the wheel at (or in the directory) `path`."""
  if isinstance(categories, str) or not categories:
    raise ValueError(f"categories must be a non-empty list of names, got {categories!r}.")
  wheel = wheels.locate(path, DISTRIBUTION)
  names = wheels.members(wheel, _DATA)
  for category in categories:
    pattern = re.compile(rf"{re.escape(_DATA)}BFCL_v\d+_{re.escape(category)}\.json$")
    found = [n for n in names if pattern.match(n)]
    if not found:
      raise FileNotFoundError(f"BFCL category {category!r} is not in {wheel!r}.")
    question_name = found[-1]
    answer_name = question_name.replace(_DATA, _DATA + "possible_answer/")
    questions = wheels.read_member(wheel, question_name)
    answer_data = wheels.read_member(wheel, answer_name)
    answers = {a.get("id"): a for a in _json_lines(answer_data, answer_name)
               if isinstance(a, dict)}
    for index, item in enumerate(_json_lines(questions, question_name)):
      rows.add(f"{category}:{index}", _problem, item, answers, category)
  return [wheel]
