"""Equivalence of normalised math answers: plain numbers, and symbolic comparison with sympy.

`plain_number` and `fractions_close` compare integers, decimals and simple fractions without
sympy. `symbolic_equal` parses both answers into values (expressions, relations, tuples, sets,
unions, matrices) and compares them; it has no time limit of its own, so the verifier runs it in
the worker processes of `mopd_jax.verifiers.math_worker`. The rules are described in the
docstring of `mopd_jax.verifiers.math`.
"""

from __future__ import annotations

import dataclasses
import fractions
import re

import sympy

from mopd_jax.verifiers import math_latex

_REL_TOL = 1e-6
_ABS_TOL = 1e-9
_EVAL_DIGITS = 30

# ---------------------------------------------------------------------------------------------
# Plain numbers, compared without sympy.

_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_PLAIN_FRACTION = re.compile(r"([+-]?)(?:\\frac\{(\d+)\}\{(\d+)\}|(\d+)/(\d+))")


def plain_number(text: str) -> tuple[fractions.Fraction, bool] | None:
  """(value, written with a decimal point) of an integer, decimal or simple fraction."""
  try:
    if _PLAIN_NUMBER.fullmatch(text):
      return fractions.Fraction(text), "." in text
    match = _PLAIN_FRACTION.fullmatch(text)
    if match:
      sign, frac_numerator, frac_denominator, numerator, denominator = match.groups()
      value = fractions.Fraction(
          int(frac_numerator or numerator), int(frac_denominator or denominator)
      )
      return (-value if sign == "-" else value), False
  except (ValueError, ZeroDivisionError):
    return None
  return None


def fractions_close(x: fractions.Fraction, y: fractions.Fraction, inexact: bool) -> bool:
  """Exact equality, or equality within the tolerances when a value was written inexactly."""
  if not inexact:
    return x == y
  tolerance = fractions.Fraction(_REL_TOL) * max(abs(x), abs(y)) + fractions.Fraction(_ABS_TOL)
  return abs(x - y) <= tolerance


# ---------------------------------------------------------------------------------------------
# Symbolic equivalence.


@dataclasses.dataclass(frozen=True)
class _Value:
  """A parsed answer.

  Attributes:
    kind: "expr" (parts = (expression,)), "rel" (parts = (math_latex.Relation,)), "seq"
      (bracketed items, in order), "set" (items in any order), "union" (`\\cup` operands, in any
      order) or "matrix" (parts = rows, each a tuple of _Value).
    parts: see `kind`.
    brackets: for "seq", the opening and closing bracket, e.g. "(]".
    inexact: for "expr" and "rel", whether a decimal number was written.
  """

  kind: str
  parts: tuple
  brackets: str = ""
  inexact: bool = False


_MATRIX = re.compile(r"\\begin\{([pbBvV]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", re.S)
_OPENERS, _CLOSERS = "([{", ")]}"
_EMPTY_SETS = (r"\emptyset", r"\varnothing", r"\{\}")
_PLUS_MINUS = re.compile(r"\\(?:pm|mp)(?![a-zA-Z])")


def _closing_index(text: str, start: int) -> int:
  """Index where the bracket at `start` is closed (any bracket kind); -1 if never."""
  depth = 0
  for index in range(start, len(text)):
    if text[index] in _OPENERS:
      depth += 1
    elif text[index] in _CLOSERS:
      depth -= 1
      if depth == 0:
        return index
  return -1


def _split_top_level(text: str, separator: str) -> list[str]:
  """`text` split at the occurrences of `separator` outside all brackets."""
  pieces, depth, start, index = [], 0, 0, 0
  while index < len(text):
    char = text[index]
    if char in _OPENERS:
      depth += 1
    elif char in _CLOSERS:
      depth -= 1
    elif depth == 0 and text.startswith(separator, index):
      pieces.append(text[start:index])
      index += len(separator)
      start = index
      continue
    index += 1
  pieces.append(text[start:])
  return pieces


def _check_finite(expression: sympy.Expr) -> sympy.Expr:
  """`expression`, or math_latex.ParseError if it is undefined (such as 1/0)."""
  if expression.has(sympy.zoo, sympy.nan):
    raise math_latex.ParseError("undefined value (division by zero)")
  return expression


def _parse_value(text: str) -> _Value:
  """Parses a normalised answer into a _Value (see its docstring)."""
  if not text:
    raise math_latex.ParseError("empty answer")
  if text in _EMPTY_SETS:
    return _Value("set", ())
  matrix = _MATRIX.fullmatch(text)
  if matrix:
    rows = [row for row in matrix.group(2).split("\\\\") if row]
    cells = tuple(tuple(_parse_value(cell) for cell in row.split("&")) for row in rows)
    if not cells or len({len(row) for row in cells}) != 1:
      raise math_latex.ParseError("ragged or empty matrix")
    return _Value("matrix", cells)
  operands = _split_top_level(text, r"\cup")
  if len(operands) > 1:
    return _Value("union", tuple(_parse_value(operand) for operand in operands))
  if text.startswith(r"\{") and text.endswith(r"\}") and _closing_index(text, 1) == len(text) - 1:
    items = _split_top_level(text[2:-2], ",")
    return _Value("set", tuple(_parse_value(item) for item in items))
  if text[0] in "([" and text[-1] in ")]" and _closing_index(text, 0) == len(text) - 1:
    items = _split_top_level(text[1:-1], ",")
    if len(items) > 1:
      return _Value("seq", tuple(_parse_value(item) for item in items), text[0] + text[-1])
  items = _split_top_level(text, ",")
  if len(items) > 1:
    return _Value("set", tuple(_parse_value(item) for item in items))
  if len(_PLUS_MINUS.findall(text)) == 1:
    variants = (_PLUS_MINUS.sub("+", text), _PLUS_MINUS.sub("-", text))
    return _Value("set", tuple(_parse_value(variant) for variant in variants))
  parser = math_latex.Parser(text)
  parsed = parser.parse()
  if isinstance(parsed, math_latex.Relation):
    _check_finite(parsed.lhs)
    _check_finite(parsed.rhs)
    return _Value("rel", (parsed,), inexact=parser.inexact)
  return _Value("expr", (_check_finite(parsed),), inexact=parser.inexact)


def _numerically_close(a: sympy.Expr, b: sympy.Expr) -> bool:
  """Whether two constant expressions agree within the tolerances at 30 digits."""
  x, y = sympy.N(a, _EVAL_DIGITS), sympy.N(b, _EVAL_DIGITS)
  if not (x.is_number and y.is_number):
    return False
  gap = sympy.Abs(x - y)
  return bool(gap <= _REL_TOL * sympy.Max(sympy.Abs(x), sympy.Abs(y)) + _ABS_TOL)


def _expressions_equal(a: sympy.Expr, b: sympy.Expr, inexact: bool) -> bool:
  """Equality of numbers (exact or within tolerance) or of symbolic expressions."""
  if a == b:
    return True
  infinities = (sympy.oo, -sympy.oo)
  if a.has(*infinities) or b.has(*infinities):
    return False
  if not a.free_symbols and not b.free_symbols:
    if a.is_Rational and b.is_Rational and not inexact:
      return False
    return _numerically_close(a, b)
  return sympy.simplify(a - b) == 0


def _proportional(d1: sympy.Expr, d2: sympy.Expr, positive: bool) -> bool:
  """Whether d1 = c * d2 for a constant c that is nonzero (positive if `positive`)."""
  if sympy.simplify(d1 - d2) == 0:
    return True
  if d2 == 0 or d1 == 0:
    return False
  ratio = sympy.simplify(d1 / d2)
  if ratio.free_symbols or not ratio.is_number:
    return False
  if positive:
    return ratio.is_positive is True
  return ratio.is_zero is False and ratio.is_finite is True


def _relations_equal(r1: math_latex.Relation, r2: math_latex.Relation) -> bool:
  """Equivalent equations or inequalities (see the module docstring)."""
  if r1.op != r2.op:
    return False
  return _proportional(r1.lhs - r1.rhs, r2.lhs - r2.rhs, positive=r1.op in ("<", "<="))


def _unordered_equal(items: tuple, others: tuple) -> bool:
  """Multiset equality of two tuples of _Value."""
  if len(items) != len(others):
    return False
  remaining = list(others)
  for item in items:
    match = next((i for i, other in enumerate(remaining) if _values_equal(item, other)), None)
    if match is None:
      return False
    remaining.pop(match)
  return True


def _values_equal(a: _Value, b: _Value) -> bool:
  """Equivalence of two parsed answers (see the module docstring)."""
  if a.kind != b.kind:
    return False
  if a.kind == "expr":
    return _expressions_equal(a.parts[0], b.parts[0], a.inexact or b.inexact)
  if a.kind == "rel":
    return _relations_equal(a.parts[0], b.parts[0])
  if a.kind in ("set", "union"):
    return _unordered_equal(a.parts, b.parts)
  if a.kind == "seq" and a.brackets != b.brackets:
    return False
  if len(a.parts) != len(b.parts):
    return False
  if a.kind == "matrix":
    return all(
        len(row) == len(other) and all(map(_values_equal, row, other))
        for row, other in zip(a.parts, b.parts)
    )
  return all(map(_values_equal, a.parts, b.parts))


def symbolic_verdict(answer: str, reference: str) -> str:
  """"equal", "different", "unparsed" (not an expression the parser knows) or "too_large".

  "too_large": an answer that would be unreasonably expensive to build (see math_latex);
  no other grader should be given it either. In this process and without a time limit.
  """
  try:
    values = _parse_value(answer), _parse_value(reference)
  except math_latex.TooLarge:
    return "too_large"
  except Exception:  # pylint: disable=broad-except  # Any parse failure: not understood.
    return "unparsed"
  try:
    return "equal" if _values_equal(*values) else "different"
  except Exception:  # pylint: disable=broad-except  # Any failure to compare means "not equal".
    return "different"


def symbolic_equal(answer: str, reference: str) -> bool:
  """Symbolic equivalence of two normalised answers, in this process and without a time limit.

  Unparseable or unreasonably large answers are not equal to anything. `score` runs this in a
  worker process under a time limit; call it directly only on trusted input.
  """
  return symbolic_verdict(answer, reference) == "equal"
