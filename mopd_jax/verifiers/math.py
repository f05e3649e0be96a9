r"""Verifier for math answers given in the last \boxed{...} of a response, graded by math-verify.

Extraction: the content of the last `\boxed{...}` (or `\fbox{...}`) of the response, nested
braces included (`\{` and `\}` are literal braces). A response without a box, whose last box
is never closed, or whose box is empty is a format error (reward 0, status "format_error",
with the reason as feedback). Wrong answers get no feedback.

Equivalence (reward 1), after surrounding `$` signs and spaces are stripped from both sides:
1. identical strings, or two integers of equal value: decided here, without a worker;
2. otherwise math-verify (the grader the MOPD authors used; see `math_verify_grader` for how it
   is called and the three readings corrected there), in a worker process under a hard
   wall-clock limit (`time_limit_s`; hitting it gives reward 0 with status "timeout"). It
   handles `\dfrac`, `\text{...}`, units, degrees, `x = ...`, decimals (rounded to 6 places),
   symbolic equivalence, sets, intervals, tuples, equations and matrices.
   Answers (or references) longer than 1,000 characters skip this step.

Percent rule (math-verify would read `50\%` as 0.5 on either side): a `%` (or `\%`) at the end
of the response's answer is read as a unit and dropped, so "50\%" matches a reference of 50 or
"50\%". A reference ending in a percent x% also accepts x/100, so 0.5 matches a reference of
"50\%". A plain reference is never divided by 100: "50\%" does not match a reference of 0.5.

References: a string, a number (int, float or Fraction), or a dict {"answer": ...} of those.
An invalid reference gives status "error" with the reason as feedback. Answers longer than
10,000 characters score 0 without being compared.
"""

from __future__ import annotations

import concurrent.futures
import decimal
import fractions
import functools
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mopd_jax.verifiers import math_worker
from mopd_jax.verifiers.result import Result

__all__ = ["extract_boxed", "score", "score_batch"]

_DEFAULT_TIME_LIMIT_S = 2.0
_MAX_TIME_LIMIT_S = 60.0
_MAX_ANSWER_CHARS = 10_000
_MAX_GRADED_CHARS = 1_000
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)
_PERCENT = re.compile(r"\s*\\?%$")
_INTEGER = re.compile(r"[+-]?\d{1,100}")


def _brace_partners(text: str) -> dict[int, int]:
  """Maps the index of each closed `{` of `text` to the index of its `}` (escapes skipped)."""
  partners, stack = {}, []
  for match in _BRACE_OR_ESCAPE.finditer(text):
    char = match.group()
    if char == "{":
      stack.append(match.start())
    elif char == "}" and stack:
      partners[stack.pop()] = match.start()
  return partners


def _last_box(response: str) -> tuple[str | None, str]:
  """(content of the last box, "") or (None, why there is no usable box)."""
  opens = [match.end() - 1 for match in _BOX_OPEN.finditer(response)]
  if not opens:
    return None, r"No \boxed{...} answer found in the response."
  start = opens[-1]
  end = _brace_partners(response).get(start)
  if end is None:
    return None, r"The last \boxed{ of the response is never closed."
  content = response[start + 1 : end]
  if not content.strip():
    return None, r"The last \boxed{} of the response is empty."
  return content, ""


def extract_boxed(response: str) -> str | None:
  r"""The content of the last `\boxed{...}`/`\fbox{...}` of `response`; None if absent or open."""
  return _last_box(response)[0]


def _reference_answer(reference: Any) -> str:
  """The reference answer as a string; raises ValueError for an invalid reference."""
  if isinstance(reference, Mapping):
    if "answer" not in reference:
      raise ValueError(f"reference dict needs an 'answer' key, got keys {sorted(reference)!r:.100}")
    reference = reference["answer"]
  if isinstance(reference, bool) or not isinstance(
      reference, (str, int, float, fractions.Fraction)
  ):
    raise ValueError(f"reference answer must be a string or a number, got {reference!r:.100}")
  if isinstance(reference, float):
    if not math.isfinite(reference):
      raise ValueError(f"reference answer must be finite, got {reference!r}")
    reference = format(decimal.Decimal(repr(reference)), "f")
  text = str(reference)
  if not text.strip():
    raise ValueError("reference answer is empty")
  return text


def _strip_dollars(text: str) -> str:
  """`text` without surrounding spaces and (unescaped) surrounding `$` signs."""
  text = text.strip()
  while len(text) >= 2 and text[0] == text[-1] == "$" and text[-2] != "\\":
    text = text[1:-1].strip()
  return text


def _candidate_pairs(answer: str, reference: str) -> list[tuple[str, str]]:
  """(answer, reference) pairs to compare under the percent rule (module docstring)."""
  answer_percent, reference_percent = _PERCENT.search(answer), _PERCENT.search(reference)
  answer = answer[: answer_percent.start()] if answer_percent else answer
  if not reference_percent:
    return [(answer, reference)]
  reference = reference[: reference_percent.start()]
  if answer_percent:
    return [(answer, reference)]
  return [(answer, reference), (answer, rf"\frac{{{reference}}}{{100}}")]


def _equivalent(answer: str, reference: str, time_limit_s: float) -> bool | None:
  """Whether two answers match (module docstring); None when the worker hit the limit."""
  pending = []
  for a, r in _candidate_pairs(_strip_dollars(answer), _strip_dollars(reference)):
    if a == r or (_INTEGER.fullmatch(a) and _INTEGER.fullmatch(r) and int(a) == int(r)):
      return True
    if a and r and len(a) <= _MAX_GRADED_CHARS and len(r) <= _MAX_GRADED_CHARS:
      pending.append((a, r))
  if not pending:
    return False
  reply = math_worker.pool().run(pending, time_limit_s)
  if reply is None or reply.get("timeout"):
    return None
  if "error" in reply:
    raise RuntimeError(f"Math worker failed: {reply['error']}")
  return bool(reply["equal"])


def _score(response: str, reference: Any, time_limit_s: float) -> Result:
  """`score` without the catch-all."""
  if not isinstance(time_limit_s, (int, float)) or not 0 < time_limit_s <= _MAX_TIME_LIMIT_S:
    raise ValueError(f"time_limit_s must be in (0, {_MAX_TIME_LIMIT_S}], got {time_limit_s!r}")
  gold = _reference_answer(reference)
  if not isinstance(response, str):
    raise TypeError(f"response must be a string, got {type(response).__name__}")
  content, problem = _last_box(response)
  if content is None:
    return Result(0.0, problem, 0.0, "format_error")
  if len(content) > _MAX_ANSWER_CHARS:
    return Result(0.0, "", 0.0, "ok")
  verdict = _equivalent(content, gold, time_limit_s)
  if verdict is None:
    return Result(0.0, "", 0.0, "timeout")
  return Result(1.0, "", 1.0, "ok") if verdict else Result(0.0, "", 0.0, "ok")


def score(response: str, reference: Any, *, time_limit_s: float = _DEFAULT_TIME_LIMIT_S) -> Result:
  r"""Scores the last \boxed{} answer of `response` against `reference`.

  Args:
    response: the model response.
    reference: the reference answer: a string, a number, or a dict {"answer": ...}.
    time_limit_s: wall-clock limit of the symbolic comparison, in (0, 60] seconds.

  Returns:
    Result(1.0, "", 1.0, "ok") if the answer is equivalent to the reference (see the module
    docstring), Result(0.0, "", 0.0, "ok") if not, reward 0 with status "format_error" and the
    reason as feedback when there is no usable box, reward 0 with status "timeout" when the
    symbolic comparison hit the limit. Never raises: a verifier failure (an invalid reference
    included) gives reward 0 with status "error" and the reason as feedback.
  """
  try:
    return _score(response, reference, time_limit_s)
  except Exception as exc:  # pylint: disable=broad-except  # Reported, never raised.
    message = f"Verifier error: {type(exc).__name__}: {exc}"
    return Result(0.0, message[: math_worker.MAX_FEEDBACK_CHARS], 0.0, "error")


def score_batch(
    responses: Sequence[str],
    references: Sequence,
    *,
    max_workers: int | None = None,
    time_limit_s: float = _DEFAULT_TIME_LIMIT_S,
) -> list[Result]:
  """`score` of each (response, reference) pair on a thread pool, in input order.

  `max_workers` defaults to os.cpu_count(). Raises ValueError when the sequences differ in
  length or `max_workers` is not positive; individual failures become "error" Results.
  """
  if len(responses) != len(references):
    raise ValueError(f"Got {len(responses)} responses but {len(references)} references.")
  if max_workers is not None and max_workers < 1:
    raise ValueError(f"max_workers must be positive, got {max_workers}.")
  if not responses:
    return []
  workers = min(max_workers or os.cpu_count() or 1, len(responses))
  grade = functools.partial(score, time_limit_s=time_limit_s)
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    return list(pool.map(grade, responses, references))
