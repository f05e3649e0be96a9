"""Verifier for multiple-choice answers given in the last <answer>...</answer> of a response.

The answer is the text inside the last `<answer>...</answer>` pair (the closing tag that comes
last, with the nearest opening tag before it; tags are matched case-insensitively). It is
normalised by repeatedly stripping surrounding whitespace, a trailing period and a pair of
surrounding parentheses (" (b). ", "B.", "(B)" and "b" all give a single letter), and must
then equal the gold letter, compared case-insensitively. Anything else, such as "B and C",
"B)" or "Option B", is wrong.

References: the gold letter as a string ("B", or "(B)" normalised the same way) or a dict
{"answer": letter}; it must normalise to a single ASCII letter, otherwise the Result has
status "error". A response without a complete tag pair, or with an empty one, scores 0 with
status "format_error" and the reason as feedback; wrong answers get no feedback.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from mopd_jax.verifiers.result import Result, error_result, score_each

_OPEN_TAG = re.compile(r"<answer>", re.IGNORECASE)
_CLOSE_TAG = re.compile(r"</answer>", re.IGNORECASE)
_LETTER = re.compile(r"[A-Za-z]")
_MAX_FEEDBACK_CHARS = 500


def extract_answer(response: str) -> str | None:
  """The raw text inside the last <answer>...</answer> of `response`; None without one."""
  closes = [match.start() for match in _CLOSE_TAG.finditer(response)]
  if not closes:
    return None
  opens = [match.end() for match in _OPEN_TAG.finditer(response, 0, closes[-1])]
  return response[opens[-1] : closes[-1]] if opens else None


def normalize_choice(text: str) -> str:
  """`text` without surrounding whitespace, a trailing period or surrounding parentheses."""
  while True:
    stripped = text.strip()
    if stripped.endswith("."):
      stripped = stripped[:-1].strip()
    if len(stripped) >= 2 and stripped[0] == "(" and stripped[-1] == ")":
      stripped = stripped[1:-1]
    if stripped == text:
      return text
    text = stripped


def _gold_letter(reference: Any) -> str:
  """The gold letter in upper case; raises ValueError for an invalid reference."""
  if isinstance(reference, Mapping):
    if "answer" not in reference:
      raise ValueError(f"reference dict needs an 'answer' key, got keys {sorted(reference)!r:.100}")
    reference = reference["answer"]
  if not isinstance(reference, str):
    raise ValueError(f"reference must be a letter string, got {reference!r:.100}")
  letter = normalize_choice(reference)
  if not _LETTER.fullmatch(letter):
    raise ValueError(f"reference must be a single letter, got {reference!r:.100}")
  return letter.upper()


def _score(response: str, reference: Any) -> Result:
  """`score` without the catch-all."""
  gold = _gold_letter(reference)
  if not isinstance(response, str):
    raise TypeError(f"response must be a string, got {type(response).__name__}")
  answer = extract_answer(response)
  if answer is None:
    return Result(0.0, "No <answer>...</answer> tag found in the response.", 0.0, "format_error")
  choice = normalize_choice(answer)
  if not choice:
    return Result(0.0, "The last <answer>...</answer> tag is empty.", 0.0, "format_error")
  correct = choice.upper() == gold
  return Result(1.0, "", 1.0, "ok") if correct else Result(0.0, "", 0.0, "ok")


def score(response: str, reference: Any) -> Result:
  """Scores the last <answer> of `response` against the gold letter.

  Args:
    response: the model response.
    reference: the gold letter, or a dict {"answer": letter}.

  Returns:
    Result(1.0, "", 1.0, "ok") if the answer is the gold letter, Result(0.0, "", 0.0, "ok")
    if it is not, reward 0 with status "format_error" and the reason as feedback when the tag
    is missing or empty. Never raises: a verifier failure (an invalid reference included)
    gives reward 0 with status "error" and the reason as feedback.
  """
  try:
    return _score(response, reference)
  except Exception as exc:  # pylint: disable=broad-except  # Reported, never raised.
    return error_result(exc, _MAX_FEEDBACK_CHARS)


def score_batch(responses: Sequence[str], references: Sequence) -> list[Result]:
  """`score` of each (response, reference) pair, in input order (see `result.score_each`)."""
  return score_each(score, responses, references)
