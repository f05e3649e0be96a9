"""The outcome of verifying one model response."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

STATUSES = ("ok", "format_error", "timeout", "error")


@dataclasses.dataclass(frozen=True)
class Result:
  """Reward and diagnostics of one verified response.

  Attributes:
    reward: the scalar reward (for code: 1.0 only if every test passes, else 0.0).
    feedback: human-readable details, e.g. the first failing tests; may be empty.
    accuracy: fraction of the tests that passed, in [0, 1].
    status: how verification ended:
      "ok": the program ran (the reward may still be 0 because tests failed or the
        program crashed);
      "format_error": the response has no code block, or the code does not parse;
      "timeout": the wall-clock limit was hit;
      "error": the verifier itself failed (a crash, an invalid reference, ...).
  """

  reward: float
  feedback: str = ""
  accuracy: float = 0.0
  status: str = "ok"

  def __post_init__(self):
    if self.status not in STATUSES:
      raise ValueError(f"Unknown status {self.status!r}; allowed: {STATUSES}.")


def error_result(exc: Exception, max_chars: int) -> Result:
  """Reward 0 with status "error": how a verifier reports its own failure (never raised)."""
  return Result(0.0, f"Verifier error: {type(exc).__name__}: {exc}"[:max_chars], 0.0, "error")


def score_each(score: Callable[[str, Any], Result], responses: Sequence[str],
               references: Sequence) -> list[Result]:
  """`score` of each (response, reference) pair, in input order.

  Raises ValueError when the sequences differ in length; a verifier that never raises
  turns individual failures into "error" Results itself.
  """
  if len(responses) != len(references):
    raise ValueError(f"Got {len(responses)} responses but {len(references)} references.")
  return [score(response, reference) for response, reference in zip(responses, references)]
