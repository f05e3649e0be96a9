"""Verifier for tool-use responses in the ReAct format ("Action:" / "Action Input:" lines).

Response format: every line of the form `Action: name` (leading spaces allowed, "Action"
spelled exactly so) names one tool call; the name is the rest of the line, stripped. Every
`Action Input:` (at the start of a line) must be followed by one JSON object, possibly spanning
several lines and optionally inside a ```json fence; text after the object is ignored.

A response without an `Action:` line, with an empty action name, or with an Action Input that
is not a JSON object scores 0 with status "format_error" and the reason as feedback. Wrong
answers get no feedback. An invalid reference gives status "error" with the reason as feedback.

References, and how each is graded (a reference may also be given as its JSON text):

- Gold actions and inputs, {"actions": [name, ...], "inputs": [object, ...]}: "actions" may
  also be a single name and must not be empty; "inputs" may be a single object, a list of
  objects or of their JSON texts, or absent or null for no inputs. Reward 1 iff the multiset
  of action names equals the gold actions (order does not matter, counts do) and the merge
  of all Action Input objects, in order (later keys override earlier ones, like
  `dict.update`), equals the merge of the gold inputs. Values are compared as JSON: strings
  exactly, numbers by value (1 equals 1.0), booleans only to booleans, lists in order.
- ToolAlpaca's native gold list, [{"Action": name, "Action_Input": JSON text or object},
  ...]: graded as the form above, except that ToolAlpaca writes optional arguments left
  unset as empty strings, so an argument whose value is "" counts as absent on both sides.
- BFCL's allowed values, {"ground_truth": [{name: {argument: [allowed value, ...]}}, ...]}
  (or the bare list): each Action is paired with the Action Input that follows it in order
  (their numbers must be equal, else "format_error"), and the calls must match the gold
  calls one to one, in any order. A call matches when the names are equal, it has no
  argument the gold call lacks, every gold argument it omits lists "" among its allowed
  values (or lists none: BFCL's optional arguments without a value to check), and every argument it gives equals one of the allowed values. Values compare as
  JSON, except strings, which compare after lower-casing and removing spaces and
  `,./-_*^` (as BFCL's checker does); an allowed value that is an object {key: [allowed]}
  is matched the same way recursively.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from mopd_jax.verifiers.result import Result, error_result, score_each

_ACTION = re.compile(r"^[ \t]*Action[ \t]*:[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_ACTION_INPUT = re.compile(r"^[ \t]*Action[ \t]+Input[ \t]*:", re.MULTILINE)
_FENCE_OPEN = re.compile(r"\s*(?:```[ \t]*(?:json)?[ \t]*\n)?\s*", re.IGNORECASE)
_DECODER = json.JSONDecoder()
_MAX_FEEDBACK_CHARS = 500
_MAX_SHOWN_CHARS = 200


class _FormatError(ValueError):
  """The response does not follow the Action / Action Input format."""


def _clip(text: str, max_chars: int) -> str:
  """`text`, cut to at most `max_chars` characters with a trailing ellipsis."""
  return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def extract_actions(response: str) -> list[str]:
  """The names of the `Action:` lines of `response`, in order."""
  return [match.group(1) for match in _ACTION.finditer(response)]


def extract_inputs(response: str) -> list[dict]:
  """The JSON objects after each `Action Input:` of `response`, in order.

  Raises:
    ValueError: an Action Input is not followed by a JSON object (the message says which).
  """
  objects = []
  for number, match in enumerate(_ACTION_INPUT.finditer(response), start=1):
    start = _FENCE_OPEN.match(response, match.end()).end()
    try:
      value, _ = _DECODER.raw_decode(response, start)
    except (ValueError, RecursionError) as exc:
      raise _FormatError(
          f"Action Input {number} is not valid JSON: {_clip(str(exc), _MAX_SHOWN_CHARS)}"
      ) from exc
    if not isinstance(value, dict):
      shown = _clip(json.dumps(value), _MAX_SHOWN_CHARS)
      raise _FormatError(f"Action Input {number} is not a JSON object: {shown}")
    objects.append(value)
  return objects


def _merge(objects: Sequence[Mapping]) -> dict:
  """All `objects` merged in order, later keys overriding earlier ones."""
  merged = {}
  for obj in objects:
    merged.update(obj)
  return merged


def _same(got: Any, expected: Any) -> bool:
  """Equality of JSON data: booleans strict, numbers by value, lists in order."""
  if isinstance(got, bool) or isinstance(expected, bool):
    return type(got) is type(expected) and got == expected
  if isinstance(got, (int, float)) and isinstance(expected, (int, float)):
    return got == expected
  if isinstance(got, list) and isinstance(expected, list):
    return len(got) == len(expected) and all(map(_same, got, expected))
  if isinstance(got, dict) and isinstance(expected, dict):
    return got.keys() == expected.keys() and all(_same(got[k], expected[k]) for k in got)
  return type(got) is type(expected) and got == expected


_BFCL_IGNORED = re.compile(r"[ ,./\-_*^]")


class _MergedGold(NamedTuple):
  """Gold action counts and merged gold inputs; `empty_is_absent`: drop "" values first."""

  actions: collections.Counter
  inputs: dict
  empty_is_absent: bool


class _AllowedGold(NamedTuple):
  """BFCL gold calls: (name, {argument: [allowed value, ...]}) pairs."""

  calls: list


def _input_objects(inputs: Any) -> list[Mapping]:
  """Gold inputs as objects: None, an object, or a list of objects or their JSON texts."""
  if inputs is None:
    inputs = []
  elif isinstance(inputs, (Mapping, str)):
    inputs = [inputs]
  if not isinstance(inputs, list):
    raise ValueError(f"reference 'inputs' must be a list of objects, got {inputs!r:.100}")
  objects = [json.loads(item) if isinstance(item, str) else item for item in inputs]
  if not all(isinstance(obj, Mapping) for obj in objects):
    raise ValueError(f"reference inputs must be JSON objects, got {inputs!r:.100}")
  return objects


def _merged_gold(actions: Any, inputs: Any, empty_is_absent: bool) -> _MergedGold:
  if isinstance(actions, str):
    actions = [actions]
  if not isinstance(actions, list) or not actions:
    raise ValueError(f"reference needs a non-empty 'actions' list, got {actions!r:.100}")
  if not all(isinstance(name, str) and name.strip() for name in actions):
    raise ValueError(f"reference actions must be non-empty strings, got {actions!r:.100}")
  merged = json.loads(json.dumps(_merge(_input_objects(inputs))))
  if empty_is_absent:
    merged = _without_empty(merged)
  return _MergedGold(collections.Counter(name.strip() for name in actions), merged,
                     empty_is_absent)


def _allowed_gold(calls: list) -> _AllowedGold:
  parsed = []
  for call in calls:
    if not (isinstance(call, Mapping) and len(call) == 1):
      raise ValueError(f"a BFCL gold call must be {{name: {{argument: [allowed]}}}}, got "
                       f"{call!r:.100}")
    (name, arguments), = call.items()
    if not (isinstance(arguments, Mapping)
            and all(isinstance(values, list) for values in arguments.values())):
      raise ValueError(f"BFCL gold call {name!r} needs a list of allowed values per argument")
    parsed.append((name, json.loads(json.dumps(arguments))))
  if not parsed:
    raise ValueError("reference 'ground_truth' has no call")
  return _AllowedGold(parsed)


def _is_bfcl_call_list(reference: Any) -> bool:
  return isinstance(reference, list) and bool(reference) and all(
      isinstance(call, Mapping) and len(call) == 1
      and isinstance(next(iter(call.values())), Mapping) for call in reference)


def _parse_reference(reference: Any) -> _MergedGold | _AllowedGold:
  """The gold of any accepted reference form; raises ValueError for an invalid one."""
  if isinstance(reference, (str, bytes)):
    reference = json.loads(reference)
  if isinstance(reference, Mapping) and "ground_truth" in reference:
    reference = reference["ground_truth"]
    if not isinstance(reference, list):
      raise ValueError(f"reference 'ground_truth' must be a list, got {reference!r:.100}")
    return _allowed_gold(reference)
  if isinstance(reference, list) and reference and all(
      isinstance(call, Mapping) and "Action" in call for call in reference):
    return _merged_gold([call["Action"] for call in reference],
                        [call.get("Action_Input") or {} for call in reference], True)
  if _is_bfcl_call_list(reference):
    return _allowed_gold(reference)
  if not isinstance(reference, Mapping):
    raise ValueError(f"reference must be a dict or a JSON object, got {reference!r:.100}")
  return _merged_gold(reference.get("actions"), reference.get("inputs"), False)


def _without_empty(inputs: dict) -> dict:
  return {key: value for key, value in inputs.items() if value != ""}


def _bfcl_string(text: str) -> str:
  return _BFCL_IGNORED.sub("", text).lower()


def _allowed_value(got: Any, allowed: Any) -> bool:
  """Whether `got` equals the allowed value (see the module docstring)."""
  if isinstance(allowed, dict):
    return isinstance(got, dict) and _allowed_arguments(got, allowed)
  if isinstance(got, str) and isinstance(allowed, str):
    return _bfcl_string(got) == _bfcl_string(allowed)
  if isinstance(got, list) and isinstance(allowed, list):
    return len(got) == len(allowed) and all(map(_allowed_value, got, allowed))
  return _same(got, allowed)


def _allowed_arguments(got: Mapping, allowed: Mapping) -> bool:
  """Arguments `got` against {argument: [allowed values]} (a bare value allows itself)."""
  if not set(got) <= set(allowed):
    return False
  for name, values in allowed.items():
    values = values if isinstance(values, list) else [values]
    if name not in got:
      if values and "" not in values:
        return False
    elif not any(_allowed_value(got[name], value) for value in values):
      return False
  return True


def _calls_match(calls: list[tuple[str, dict]], gold: list[tuple[str, dict]]) -> bool:
  """Whether `calls` match the `gold` calls one to one, in any order (backtracking)."""
  if len(calls) != len(gold):
    return False
  if not calls:
    return True
  name, arguments = calls[0]
  for index, (gold_name, allowed) in enumerate(gold):
    if name == gold_name and _allowed_arguments(arguments, allowed):
      if _calls_match(calls[1:], gold[:index] + gold[index + 1:]):
        return True
  return False


def _score(response: str, reference: Any) -> Result:
  """`score` without the catch-all."""
  gold = _parse_reference(reference)
  if not isinstance(response, str):
    raise TypeError(f"response must be a string, got {type(response).__name__}")
  actions = extract_actions(response)
  if not actions:
    return Result(0.0, "No 'Action:' line found in the response.", 0.0, "format_error")
  if not all(actions):
    return Result(0.0, "An 'Action:' line has no tool name.", 0.0, "format_error")
  try:
    objects = extract_inputs(response)
  except _FormatError as exc:
    return Result(0.0, _clip(str(exc), _MAX_FEEDBACK_CHARS), 0.0, "format_error")
  if isinstance(gold, _AllowedGold):
    if len(objects) != len(actions):
      return Result(0.0, f"{len(actions)} 'Action:' lines but {len(objects)} 'Action Input:' "
                    "objects; give one Action Input after each Action.", 0.0, "format_error")
    correct = _calls_match(list(zip(actions, objects)), gold.calls)
  else:
    inputs = _merge(objects)
    if gold.empty_is_absent:
      inputs = _without_empty(inputs)
    correct = collections.Counter(actions) == gold.actions and _same(inputs, gold.inputs)
  return Result(1.0, "", 1.0, "ok") if correct else Result(0.0, "", 0.0, "ok")


def score(response: str, reference: Any) -> Result:
  """Scores the tool calls of `response` against the gold actions and inputs.

  Args:
    response: the model response in the Action / Action Input format.
    reference: {"actions": [...], "inputs": [...]}, a ToolAlpaca gold list, BFCL allowed
      values, or the JSON text of one (see the module docstring).

  Returns:
    Result(1.0, "", 1.0, "ok") if the calls match the reference,
    Result(0.0, "", 0.0, "ok") if not, reward 0 with status "format_error" and the reason as
    feedback for a missing Action line or malformed Action Input. Never raises: a verifier
    failure (an invalid reference included) gives reward 0 with status "error" and the reason
    as feedback.
  """
  try:
    return _score(response, reference)
  except Exception as exc:  # pylint: disable=broad-except  # Reported, never raised.
    return error_result(exc, _MAX_FEEDBACK_CHARS)


def score_batch(responses: Sequence[str], references: Sequence) -> list[Result]:
  """`score` of each (response, reference) pair, in input order (see `result.score_each`)."""
  return score_each(score, responses, references)
