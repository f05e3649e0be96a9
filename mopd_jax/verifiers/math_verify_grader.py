r"""Equivalence by `math-verify`, the grader the MOPD authors used (runs in the math workers).

Both answers arrive normalised by `math_answer.normalize_answer` (and the percent rule of
`math.py`), are wrapped in `\boxed{}`, parsed by math-verify's LaTeX extraction and compared
by `math_verify.verify` with its defaults (numbers rounded to 6 decimals, sets and intervals
as such). math-verify's own timeouts rely on SIGALRM and are turned off: the worker process
that calls this is killed by its parent at the time limit instead.
"""

from __future__ import annotations

import logging

import math_verify

# math-verify warns on every call that its own timeouts are off; the worker's limit applies.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def equivalent(answer: str, reference: str) -> bool:
  """Whether math-verify finds the two normalised answers equivalent (False if unparsable)."""
  try:
    gold = math_verify.parse(f"\\boxed{{{reference}}}", parsing_timeout=None)
    target = math_verify.parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    return bool(gold) and bool(target) and bool(
        math_verify.verify(gold, target, timeout_seconds=None))
  except Exception:  # pylint: disable=broad-except  # Any grader failure means "not equal".
    return False
