"""Verifier for tool-use responses in the ReAct format ("Action:" / "Action Input:" lines).

Response format: every line of the form `Action: name` (leading spaces allowed, "Action"
spelled exactly so) names one tool call; the name is the rest of the line, stripped. Every
`Action Input:` (at the start of a line) must be followed by one JSON object, possibly spanning
several lines and optionally inside a ```json fence; text after the object is ignored.

Reward 1 iff both hold:
- the multiset of action names equals the gold actions (order does not matter, counts do);
- the merge of all Action Input objects, in order (later keys override earlier ones, like
  `dict.update`), equals the merge of the gold inputs. Values are compared as JSON: strings
  exactly, numbers by value (1 equals 1.0), booleans only to booleans, lists in order.

A response without an `Action:` line, with an empty action name, or with an Action Input that
is not a JSON object scores 0 with status "format_error" and the reason as feedback. Wrong
answers get no feedback.

References: a dict (or its JSON text) {"actions": [name, ...], "inputs": [object, ...]}.
"actions" may also be a single name and must not be empty; "inputs" may be a single object,
a list of objects or of their JSON texts (as ToolAlpaca stores them), or absent or null for
no inputs. An invalid reference gives status "error" with the reason as feedback.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

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


def _parse_reference(reference: Any) -> tuple[collections.Counter, dict]:
  """(gold action counts, merged gold inputs); raises ValueError for an invalid reference."""
  if isinstance(reference, (str, bytes)):
    reference = json.loads(reference)
  if not isinstance(reference, Mapping):
    raise ValueError(f"reference must be a dict or a JSON object, got {reference!r:.100}")
  actions = reference.get("actions")
  if isinstance(actions, str):
    actions = [actions]
  if not isinstance(actions, list) or not actions:
    raise ValueError(f"reference needs a non-empty 'actions' list, got {actions!r:.100}")
  if not all(isinstance(name, str) and name.strip() for name in actions):
    raise ValueError(f"reference actions must be non-empty strings, got {actions!r:.100}")
  inputs = reference.get("inputs")
  if inputs is None:
    inputs = []
  elif isinstance(inputs, (Mapping, str)):
    inputs = [inputs]
  if not isinstance(inputs, list):
    raise ValueError(f"reference 'inputs' must be a list of objects, got {inputs!r:.100}")
  objects = [json.loads(item) if isinstance(item, str) else item for item in inputs]
  if not all(isinstance(obj, Mapping) for obj in objects):
    raise ValueError(f"reference inputs must be JSON objects, got {inputs!r:.100}")
  merged = json.loads(json.dumps(_merge(objects)))
  return collections.Counter(name.strip() for name in actions), merged


def _score(response: str, reference: Any) -> Result:
  """`score` without the catch-all."""
  gold_actions, gold_inputs = _parse_reference(reference)
  if not isinstance(response, str):
    raise TypeError(f"response must be a string, got {type(response).__name__}")
  actions = extract_actions(response)
  if not actions:
    return Result(0.0, "No 'Action:' line found in the response.", 0.0, "format_error")
  if not all(actions):
    return Result(0.0, "An 'Action:' line has no tool name.", 0.0, "format_error")
  try:
    inputs = _merge(extract_inputs(response))
  except _FormatError as exc:
    return Result(0.0, _clip(str(exc), _MAX_FEEDBACK_CHARS), 0.0, "format_error")
  correct = collections.Counter(actions) == gold_actions and _same(inputs, gold_inputs)
  return Result(1.0, "", 1.0, "ok") if correct else Result(0.0, "", 0.0, "ok")


def score(response: str, reference: Any) -> Result:
  """Scores the tool calls of `response` against the gold actions and inputs.

  Args:
    response: the model response in the Action / Action Input format.
    reference: {"actions": [...], "inputs": [...]} or its JSON text (see the module
      docstring for the accepted forms).

  Returns:
    Result(1.0, "", 1.0, "ok") if the actions and merged inputs match,
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
