r"""Equivalence of two math answers by math-verify, the grader the MOPD authors used.

Runs in the worker processes of `math_worker`, which enforce the time limit: math-verify's own
timeouts rely on SIGALRM from the main thread and are turned off here.

Each answer is wrapped in `\boxed{}` and parsed by math-verify's LaTeX extraction alone: its
plain-expression extraction would read a number out of an answer that the LaTeX parser rejects
(`\lambda=2\sqrt{2}, A(\pm 1, 0)` would become 0 and match an answer of 0). Then
`math_verify.verify(reference, answer)` compares them with its defaults: numbers rounded to 6
decimals, symbolic simplification, sets, intervals, tuples, equations, inequalities and
matrices. Answers that its parser does not understand match only as identical strings.

Three readings of math-verify are corrected (each has a test):
- `\varnothing` is the empty set, as `\emptyset` is (math-verify reads a symbol);
- a digit group after a thin space (`1\,000`, `1\ 000`) is a thousands separator, not a
  product (math-verify reads `1\,000` as 1*000 = 0);
- an odd root of a negative number is the real root (`\sqrt[3]{-8}` is -2, where math-verify
  keeps the principal complex root).
"""

from __future__ import annotations

import logging
import re

import math_verify
import sympy

# math-verify warns once per process that its own timeouts are off; the worker's limit applies.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_EXTRACTION = (math_verify.LatexExtractionConfig(),)
_THIN_SPACE_SEPARATOR = re.compile(r"(?<=\d)(?:\\[,;: ]|~)(?=\d{3}(?!\d))")
_VARNOTHING = re.compile(r"\\varnothing(?![a-zA-Z])")


def _is_odd_root_of_negative(expression: sympy.Basic) -> bool:
  return (isinstance(expression, sympy.Pow) and expression.exp.is_Rational
          and expression.exp.q % 2 == 1 and expression.base.is_number
          and expression.base.is_extended_negative is True)


def _real_root(power: sympy.Pow) -> sympy.Expr:
  """(-b)^(p/q) with b > 0 and q odd, as the real number (-1)^p b^(p/q)."""
  return (-1) ** power.exp.p * sympy.Pow(-power.base, power.exp)


def _parse(answer: str) -> list:
  """math-verify's reading of `answer`: [sympy value, string] or [string] or []."""
  answer = _VARNOTHING.sub(r"\\emptyset", _THIN_SPACE_SEPARATOR.sub("", answer))
  parsed = math_verify.parse(f"\\boxed{{{answer}}}", list(_EXTRACTION), parsing_timeout=None)
  return [value.replace(_is_odd_root_of_negative, _real_root)
          if isinstance(value, (sympy.Basic, sympy.MatrixBase)) else value
          for value in parsed]


def equivalent(answer: str, reference: str) -> bool:
  """Whether math-verify finds `answer` equivalent to `reference` (module docstring)."""
  try:
    gold, target = _parse(reference), _parse(answer)
    return bool(gold) and bool(target) and bool(
        math_verify.verify(gold, target, timeout_seconds=None))
  except Exception:  # pylint: disable=broad-except  # Any grader failure means "not equal".
    return False
