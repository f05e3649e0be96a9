"""ToolAlpaca: each file is a JSON list of tools, with their requests and gold calls.

A tool has `Name`, `Description`, `NLDocumentation` (the functions in prose),
`Function_Description` ({function: description}), `Function_Projection`, `Documentation`
(OpenAPI text), ... Evaluation files (`eval_simulated.json`, `eval_real.json`) pair
`Instructions` (user requests) with `Golden_Answers` (per request, a list of
{"Action": name, "Action_Input": JSON text}); the training file's `Instances` hold
{"input": request, "intermediate_steps": [[[action, action_input_json, log],
observation], ...]}. One problem per request.

Reference: the native gold list [{"Action": name, "Action_Input": JSON text}, ...]
(`verifiers.tooluse` reads it). A gold call whose Action_Input is not a JSON object is a bad
row. Ids: `<tool name>/<request index>` (`<tool name>/train/<instance index>` for
instances). Locations: `tool T, request R` (0-based), prefixed with the file name when a
directory holds several files.
"""

from __future__ import annotations

import json
import os

from mopd_jax.data.sources import common, instructions


def _tools_text(tool: dict) -> str:
  """The tool's description for the prompt: its prose documentation, else its functions."""
  lines = [f"{tool['Name']}: {str(tool.get('Description') or '').strip()}"]
  documentation = tool.get("NLDocumentation")
  functions = tool.get("Function_Description")
  if isinstance(documentation, str) and documentation.strip():
    lines.append(documentation.strip())
  elif isinstance(functions, dict) and functions:
    lines.extend(f"{name}: {text}" for name, text in functions.items())
  else:
    raise common.BadRow("NLDocumentation", "the tool has neither NLDocumentation nor "
                        "Function_Description")
  return "\n".join(lines)


def _gold_call(action, action_input, name: str) -> dict:
  """One validated gold call {"Action": name, "Action_Input": JSON text of an object}."""
  if not isinstance(action, str) or not action.strip():
    raise common.BadRow(name, f"gold action name must be a non-empty string, got {action!r}")
  if isinstance(action_input, str):
    try:
      parsed = json.loads(action_input) if action_input.strip() else {}
    except ValueError as exc:
      raise common.BadRow(name, f"Action_Input of {action!r} is not JSON: "
                          f"{action_input[:80]!r}") from exc
  else:
    parsed = action_input
  if not isinstance(parsed, dict):
    raise common.BadRow(name, f"Action_Input of {action!r} is not a JSON object: "
                        f"{json.dumps(parsed)[:80]}")
  return {"Action": action.strip(), "Action_Input": json.dumps(parsed, ensure_ascii=False)}


def _eval_problem(tool: dict, index: int, request, answers) -> common.Problem:
  if not isinstance(request, str) or not request.strip():
    raise common.BadRow("Instructions", f"request {index} is not a non-empty string")
  if not isinstance(answers, list) or not answers:
    raise common.BadRow("Golden_Answers", f"request {index} has no gold call")
  gold = []
  for call in answers:
    if not isinstance(call, dict):
      raise common.BadRow("Golden_Answers", f"a gold call is not an object: {call!r:.80}")
    gold.append(_gold_call(call.get("Action"), call.get("Action_Input"), "Golden_Answers"))
  return common.Problem(f"{tool['Name']}/{index}", "tooluse",
                        instructions.tooluse(request, _tools_text(tool)), gold,
                        {"tool": tool["Name"], "category": tool.get("Category")})


def _train_problem(tool: dict, index: int, instance) -> common.Problem:
  request = common.field(instance, "input")
  steps = common.field(instance, "intermediate_steps", list)
  gold = []
  for step in steps:
    if not (isinstance(step, list) and step and isinstance(step[0], list)
            and len(step[0]) >= 2):
      raise common.BadRow("intermediate_steps", f"a step is not [[action, input, log], "
                          f"observation]: {step!r:.80}")
    gold.append(_gold_call(step[0][0], step[0][1], "intermediate_steps"))
  if not gold:
    raise common.BadRow("intermediate_steps", "no tool call")
  return common.Problem(f"{tool['Name']}/train/{index}", "tooluse",
                        instructions.tooluse(request, _tools_text(tool)), gold,
                        {"tool": tool["Name"], "category": tool.get("Category")})


def _tool_problems(tool, where: str, rows: common.Rows) -> None:
  """Adds the problems of one tool (one per request or instance)."""
  try:
    common.field(tool, "Name")
  except common.BadRow as exc:
    rows.reject(where, exc.field, exc.reason)
    return
  requests, answers = tool.get("Instructions"), tool.get("Golden_Answers")
  instances = tool.get("Instances")
  if answers is not None:
    if not isinstance(requests, list) or not isinstance(answers, list) or len(
        requests) != len(answers):
      rows.reject(where, "Golden_Answers", "needs one gold list per entry of Instructions")
      return
    for index, (request, gold) in enumerate(zip(requests, answers)):
      rows.add(f"{where}, request {index}", _eval_problem, tool, index, request, gold)
  elif isinstance(instances, list):
    for index, instance in enumerate(instances):
      rows.add(f"{where}, request {index}", _train_problem, tool, index, instance)
  else:
    rows.reject(where, "Golden_Answers", "the tool has neither Golden_Answers nor Instances")


def load(path: str, rows: common.Rows) -> list[str]:
  """Reads ToolAlpaca JSON file(s) at `path` into `rows`; returns the files read."""
  paths = common.files(path, ("*.json",), "ToolAlpaca")
  for file in paths:
    prefix = f"{os.path.basename(file)}: " if len(paths) > 1 else ""
    for index, tool in enumerate(common.json_list(file)):
      _tool_problems(tool, f"{prefix}tool {index}", rows)
  return paths
