r"""Verifier for math answers given in the last \boxed{...} of a response.

Extraction: the content of the last `\boxed{...}` (or `\fbox{...}`) of the response, nested
braces included (`\{` and `\}` are literal braces). A response without a box, whose last box
is never closed, or whose box is empty is a format error (reward 0, status "format_error",
with the reason as feedback). Wrong answers get no feedback.

Normalisation (both the answer and the reference): `$`, `\$`, `\displaystyle`, `\left`,
`\right` and `\big`-style sizes are dropped; `\dfrac`/`\tfrac`/`\cfrac` become `\frac`;
`\text{...}`, `\mathrm{...}`, `\mathbf{...}`, `\mbox{...}`, `\operatorname{...}` and similar
wrappers keep only their content; spacing commands (`\!`, `\,`, `\;`, `\quad`, `~`) and spaces
go (one space is kept after a command name followed by a letter, as in `\pi r`); degree marks
(`^\circ`, `^{\circ}`, `\degree`, `°`) go; a trailing unit goes where that is safe: a trailing
`\text{...}` of words after a number or a closing bracket, or a known multi-letter unit word
(cm, meters, units, dollars, ...) after a number; a trailing period goes; `\leq`/`\geq`/`\neq`
become `\le`/`\ge`/`\ne`; thousands separators go (`1,000` and `1{,}000` become `1000`); a
leading `x =` (a single variable, possibly subscripted, followed by `=`, `\in` or `\approx`) goes
when no other `=` follows; bare function names (`sqrt`, `sin`, `ln`, `pi`, ...) become commands.

Equivalence, checked in this order (the first that holds gives reward 1):

1. the normalised strings are equal (case-insensitively when either is text, i.e. contains a
   run of three or more letters outside a command name; text answers stop here);
2. both are plain numbers (integers, decimals, `a/b`, `\frac{a}{b}`): compared in the calling
   process, by the number rule below;
3. symbolic equivalence, computed by a worker process under a hard wall-clock limit
   (`time_limit_s`; hitting it gives reward 0 with status "timeout"). The LaTeX is converted
   to sympy by the small parser in this module (fractions, roots, powers, `\cdot`, `\times`,
   implicit multiplication, `\pi`, `e`, `\infty`, factorials, binomials, trigonometric and
   logarithmic functions, absolute values, floor and ceiling), never by `eval`. Then:
   - numbers: two rationals written without decimals must be equal exactly; otherwise (a
     decimal on either side, or an irrational value) they are evaluated to 30 digits and must
     agree within a relative tolerance of 1e-6 (absolute 1e-9), so 0.5 equals \frac{1}{2} and
     0.3333333 equals \frac{1}{3}, but 0.33 does not;
   - expressions with variables: `sympy.simplify(answer - reference) == 0` (so `x+1` equals
     `1+x` and `x^2-1` equals `(x-1)(x+1)`);
   - bracketed pairs or tuples `(a, b]`, `[a, b)`, `(a, b)`: the same brackets and the same
     number of items, equal item by item (which is the endpoint-wise comparison of intervals);
   - `\{a, b\}`, and top-level comma lists without brackets: equal as multisets (any order);
     unions `A \cup B` likewise; an answer with one `\pm` (or `\mp`) stands for the set of
     its two values, so `1 \pm \sqrt{2}` equals `1-\sqrt{2}, 1+\sqrt{2}`; matrices (`pmatrix`,
     `bmatrix`, ...) entry by entry;
   - equations `l = r` (and `\ne`): `l - r` proportional by a nonzero constant; inequalities
     `<`, `\le`, `>`, `\ge`: the same strictness, and proportional by a positive constant.
   Expressions that would be unreasonably expensive are rejected before they are built (and
   then do not match): more than 1000 characters, nesting deeper than about 30 brackets, a
   power of a constant whose result would have more than about 200,000 bits, a power of a
   non-constant expression with an exponent above 10,000, or a factorial or binomial of more
   than 10,000.

Percent rule: a `%` (or `\%`) at the end of the response's answer is read as a unit and
dropped, so "50\%" matches a reference of 50 or "50\%". A reference ending in a percent x%
also accepts x/100, so 0.5 matches a reference of "50\%". A plain reference is never divided
by 100: "50\%" does not match a reference of 0.5.

References: a string, a number (int, float or Fraction), or a dict {"answer": ...} of those.
An invalid reference gives status "error" with the reason as feedback. Answers longer than
10,000 characters score 0 without being compared.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import decimal
import fractions
import functools
import json
import math
import os
import re
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import sympy

from mopd_jax.verifiers.result import Result

_DEFAULT_TIME_LIMIT_S = 2.0
_MAX_TIME_LIMIT_S = 60.0
_STARTUP_TIMEOUT_S = 60.0
_WORKER_MEMORY_BYTES = 4 << 30
_MAX_ANSWER_CHARS = 10_000
_MAX_SYMBOLIC_CHARS = 1_000
_MAX_NESTING = 60  # Counted twice per bracket level (operand and atom), so 30 levels.
_MAX_RESULT_BITS = 200_000
_MAX_EXPONENT = 10_000
_MAX_FACTORIAL = 10_000
_REL_TOL = 1e-6
_ABS_TOL = 1e-9
_EVAL_DIGITS = 30
_MAX_FEEDBACK_CHARS = 500

# ---------------------------------------------------------------------------------------------
# Extraction.

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_OR_ESCAPE = re.compile(r"\\.|[{}]", re.DOTALL)


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


# ---------------------------------------------------------------------------------------------
# Normalisation.

_CHAR_REPLACEMENTS = (
    ("\u2212", "-"),
    ("\u00d7", r"\times "),
    ("\u00b7", r"\cdot "),
    ("\u22c5", r"\cdot "),
    ("\u00f7", r"\div "),
    ("\u03c0", r"\pi "),
    ("\u221e", r"\infty "),
    ("\u221a", r"\sqrt"),
    ("\u2264", r"\le "),
    ("\u2265", r"\ge "),
    ("\u2260", r"\ne "),
    ("\u222a", r"\cup "),
    ("\u00b0", ""),
)
_SUBSTITUTIONS = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"\\\$", ""),
        (r"\$", ""),
        (r"\\[dtc]frac(?![a-zA-Z])", r"\\frac"),
        (r"\\[dt]binom(?![a-zA-Z])", r"\\binom"),
        (r"\\(?:left|right)\.", ""),
        (r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])", ""),
        (r"\\(?:displaystyle|textstyle|scriptstyle|limits)(?![a-zA-Z])", ""),
        (r"\\q?quad(?![a-zA-Z])", " "),
        (r"~", " "),
        (r"\\lbrace(?![a-zA-Z])", r"\\{"),
        (r"\\rbrace(?![a-zA-Z])", r"\\}"),
        (r"\\(?:leqslant|leq)(?![a-zA-Z])", r"\\le"),
        (r"\\(?:geqslant|geq)(?![a-zA-Z])", r"\\ge"),
        (r"\\neq(?![a-zA-Z])", r"\\ne"),
        (r"\\(?:[lr]?vert)(?![a-zA-Z])", "|"),
        (r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])", ""),
        (r"\\%", "%"),
    )
)
# `\\` (a matrix row break) stays; `\,`, `\;`, `\:`, `\!` and `\ ` become a space.
_SPACING = re.compile(r"\\\\|\\[,;:! ]")
_WHITESPACE = re.compile(r"\s+")
_TRAILING_TEXT_UNIT = re.compile(
    r"(?<=[\d}).%])\s?\\(?:text|textrm|textnormal|mbox)\s?\{\s?[a-zA-Z][a-zA-Z./ ^\d]{0,40}\}"
    r"(?:\^\{?[23]\}?)?$"
)
_WRAPPER = re.compile(
    r"\\(?:text|textrm|textnormal|textbf|textit|textsf|texttt|emph|mathrm|mathbf|mathit|"
    r"mathsf|mathtt|mathbb|mathcal|mbox|hbox|operatorname|boldsymbol|bm|boxed|fbox)\s*\{"
)
_UNIT_WORDS = (
    "units?|square units?|cubic units?|sq units?|cm|mm|km|kg|mg|ml|mL|ft|feet|foot|inch|inches|"
    "meters?|metres?|kilometers?|centimeters?|millimeters?|miles?|mph|yards?|hours?|hrs?|"
    "minutes?|mins?|seconds?|secs?|days?|weeks?|months?|years?|dollars?|cents?|degrees?|"
    "liters?|litres?|grams?|kilograms?|pounds?|lbs?|ounces?|oz"
)
_TRAILING_UNIT_WORD = re.compile(rf"(?<=[\d}})])\s?(?:{_UNIT_WORDS})\s?(?:\^\{{?[23]\}}?)?$")
_BARE_FUNCTION = re.compile(
    r"(?<![\\a-zA-Z])(arcsin|arccos|arctan|sinh|cosh|tanh|sin|cos|tan|cot|sec|csc|ln|log|exp|"
    r"sqrt|pi|infty)(?![a-zA-Z])"
)
_COMMAND_SPACE = re.compile(r"(\\[a-zA-Z]+) (?=[a-zA-Z])")
_LEADING_VARIABLE = re.compile(
    r"(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_(?:\{[a-zA-Z0-9]*\}|[a-zA-Z0-9]))?"
    r"(?:=|\\in(?![a-zA-Z])|\\approx(?![a-zA-Z]))"
)
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_TEXT_WORD = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}")
_ENVIRONMENT = re.compile(r"\\(?:begin|end)\{[a-zA-Z*]+\}")


def _unwrap(text: str) -> str:
  """`text` with each `\\text{...}`-like wrapper replaced by its content (one linear pass)."""
  pieces, closers, position = [], [], 0
  for match in _BRACE_OR_ESCAPE.finditer(text):
    start, token = match.start(), match.group()
    if start < position:
      continue
    wrapper = _WRAPPER.match(text, start) if token[0] == "\\" else None
    if wrapper:
      pieces.append(text[position:start] + " ")
      closers.append(True)
      position = wrapper.end()
    elif token == "{":
      closers.append(False)
    elif token == "}" and closers and closers.pop():
      pieces.append(text[position:start] + " ")
      position = match.end()
  pieces.append(text[position:])
  return "".join(pieces)


def normalize_answer(answer: str) -> str:
  """The normalised form of an answer string (see the module docstring)."""
  text = answer.strip()
  for old, new in _CHAR_REPLACEMENTS:
    text = text.replace(old, new)
  for pattern, replacement in _SUBSTITUTIONS:
    text = pattern.sub(replacement, text)
  text = _SPACING.sub(lambda match: match.group() if match.group() == "\\\\" else " ", text)
  text = _WHITESPACE.sub(" ", text).strip()
  while True:
    shorter = _TRAILING_TEXT_UNIT.sub("", text).strip()
    if shorter == text or not shorter:
      break
    text = shorter
  text = _WHITESPACE.sub(" ", _unwrap(text)).strip()
  shorter = _TRAILING_UNIT_WORD.sub("", text).strip()
  text = shorter or text
  text = _BARE_FUNCTION.sub(r"\\\1", text)
  text = _COMMAND_SPACE.sub("\\1\x00", text).replace(" ", "").replace("\x00", " ")
  text = text.replace("{,}", "").rstrip(".")
  leading = _LEADING_VARIABLE.match(text)
  if leading and leading.end() < len(text) and "=" not in text[leading.end() :]:
    text = text[leading.end() :]
  if _THOUSANDS.fullmatch(text):
    text = text.replace(",", "")
  return text


def _is_text(answer: str) -> bool:
  """Whether a normalised answer is prose rather than math (a run of 3+ plain letters)."""
  return _TEXT_WORD.search(_ENVIRONMENT.sub("", answer)) is not None


# ---------------------------------------------------------------------------------------------
# Plain numbers, compared without sympy.

_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_PLAIN_FRACTION = re.compile(r"([+-]?)(?:\\frac\{(\d+)\}\{(\d+)\}|(\d+)/(\d+))")


def _plain_number(text: str) -> tuple[fractions.Fraction, bool] | None:
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


def _fractions_close(x: fractions.Fraction, y: fractions.Fraction, inexact: bool) -> bool:
  """Exact equality, or equality within the tolerances when a value was written inexactly."""
  if not inexact:
    return x == y
  tolerance = fractions.Fraction(_REL_TOL) * max(abs(x), abs(y)) + fractions.Fraction(_ABS_TOL)
  return abs(x - y) <= tolerance


# ---------------------------------------------------------------------------------------------
# LaTeX to sympy (runs in the worker process).


class _ParseError(ValueError):
  """The text is not an expression this converter understands."""


class _TooLarge(ValueError):
  """The expression would be unreasonably expensive to build or compare."""


_TOKEN = re.compile(r"(\d+(?:\.\d*)?|\.\d+)|(\\[a-zA-Z]+|\\.)|([a-zA-Z])|(\s+)|(.)", re.DOTALL)
_TOKEN_KINDS = {1: "num", 2: "cmd", 3: "letter", 4: "space", 5: "op"}
_GREEK = frozenset(
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu "
    "xi rho sigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Pi Sigma "
    "Upsilon Phi Psi Omega".split()
)
_FUNCTIONS = {
    "sin": sympy.sin,
    "cos": sympy.cos,
    "tan": sympy.tan,
    "cot": sympy.cot,
    "sec": sympy.sec,
    "csc": sympy.csc,
    "arcsin": sympy.asin,
    "arccos": sympy.acos,
    "arctan": sympy.atan,
    "sinh": sympy.sinh,
    "cosh": sympy.cosh,
    "tanh": sympy.tanh,
    "ln": sympy.log,
    "log": sympy.log,
    "exp": sympy.exp,
}
_INVERSES = {"sin": sympy.asin, "cos": sympy.acos, "tan": sympy.atan}
_ATOM_COMMANDS = frozenset(
    {r"\frac", r"\sqrt", r"\binom", r"\pi", r"\infty", r"\lfloor", r"\lceil"}
    | {"\\" + name for name in _GREEK | set(_FUNCTIONS)}
)
_RELATIONS = {"=": "=", r"\le": "<=", r"\ge": ">=", r"\ne": "!=", r"\lt": "<", r"\gt": ">"}


@dataclasses.dataclass(frozen=True)
class _Relation:
  """`lhs op rhs` with op one of "=", "!=", "<", "<=" (">" and ">=" are swapped)."""

  op: str
  lhs: sympy.Expr
  rhs: sympy.Expr


class _Parser:
  """Recursive-descent converter of one normalised LaTeX expression or relation to sympy."""

  def __init__(self, text: str):
    self._tokens = [
        (_TOKEN_KINDS[match.lastindex], match.group())
        for match in _TOKEN.finditer(text)
        if match.lastindex != 4
    ]
    self._position = 0
    self._nesting = 0
    self._abs_depth = 0
    self.inexact = False

  def parse(self) -> sympy.Expr | _Relation:
    """The whole text as a sympy expression or a relation between two expressions."""
    left = self._expression()
    op = self._relation_op()
    if op is None:
      result = left
    else:
      right = self._expression()
      if op in (">", ">="):
        op, left, right = op.replace(">", "<"), right, left
      result = _Relation(op, left, right)
    if self._position < len(self._tokens):
      raise _ParseError(f"unexpected {self._peek()!r}")
    return result

  def _peek(self) -> str:
    return self._tokens[self._position][1] if self._position < len(self._tokens) else ""

  def _peek_kind(self) -> str:
    return self._tokens[self._position][0] if self._position < len(self._tokens) else "end"

  def _next(self) -> tuple[str, str]:
    if self._position >= len(self._tokens):
      raise _ParseError("unexpected end of the expression")
    self._position += 1
    return self._tokens[self._position - 1]

  def _expect(self, *texts: str) -> None:
    token = self._next()[1]
    if token not in texts:
      raise _ParseError(f"expected {' or '.join(texts)}, got {token!r}")

  def _nest(self) -> None:
    self._nesting += 1
    if self._nesting > _MAX_NESTING:
      raise _TooLarge("nested too deeply")

  def _relation_op(self) -> str | None:
    token = self._peek()
    if token in _RELATIONS:
      self._next()
      return _RELATIONS[token]
    if token in ("<", ">"):
      self._next()
      if self._peek() == "=":
        self._next()
        return token + "="
      return token
    return None

  def _expression(self) -> sympy.Expr:
    value = self._term()
    while self._peek() in ("+", "-"):
      sign = self._next()[1]
      term = self._term()
      value = value + term if sign == "+" else value - term
    return value

  def _starts_factor(self) -> bool:
    kind, token = self._peek_kind(), self._peek()
    if kind in ("num", "letter"):
      return True
    if token in ("(", "[", "{"):
      return True
    if token == "|":
      return self._abs_depth == 0
    return token in _ATOM_COMMANDS

  def _term(self) -> sympy.Expr:
    value = self._unary()
    while True:
      token = self._peek()
      if token in ("*", r"\cdot", r"\times"):
        self._next()
        value = value * self._unary()
      elif token in ("/", r"\div"):
        self._next()
        value = value / self._unary()
      elif self._starts_factor():
        value = value * self._power()
      else:
        return value

  def _unary(self) -> sympy.Expr:
    self._nest()
    try:
      if self._peek() == "-":
        self._next()
        return -self._unary()
      if self._peek() == "+":
        self._next()
        return self._unary()
      return self._power()
    finally:
      self._nesting -= 1

  def _power(self) -> sympy.Expr:
    base = self._postfix()
    if self._peek() != "^":
      return base
    self._next()
    return _checked_power(base, self._unary())

  def _postfix(self) -> sympy.Expr:
    value = self._atom()
    while self._peek() == "!":
      self._next()
      value = _checked_factorial(value)
    return value

  def _number(self, text: str) -> sympy.Expr:
    if "." in text:
      self.inexact = True
    value = fractions.Fraction(text)
    return sympy.Rational(value.numerator, value.denominator)

  def _subscript(self) -> str | None:
    """The raw text of a `_x` or `_{...}` subscript, if one follows."""
    if self._peek() != "_":
      return None
    self._next()
    if self._peek() != "{":
      return self._next()[1]
    self._next()
    parts, depth = [], 1
    while True:
      token = self._next()[1]
      depth += {"{": 1, "}": -1}.get(token, 0)
      if depth == 0:
        return "".join(parts)
      parts.append(token)

  def _symbol(self, name: str) -> sympy.Expr:
    subscript = self._subscript()
    if subscript is not None:
      return sympy.Symbol(f"{name}_{subscript}")
    if name == "e":
      return sympy.E
    if name == "pi":
      return sympy.pi
    return sympy.Symbol(name)

  def _group(self, closing: str) -> sympy.Expr:
    value = self._expression()
    self._expect(closing)
    return value

  def _argument(self) -> sympy.Expr:
    r"""A command argument: `{...}`, or one token as in LaTeX (`\frac12` is 1/2)."""
    kind, token = self._tokens[self._position] if self._position < len(self._tokens) else ("", "")
    if token == "{":
      self._next()
      return self._group("}")
    if kind == "num":
      self._next()
      if len(token) > 1:
        self._tokens.insert(self._position, ("num", token[1:]))
        token = token[0]
      return self._number(token)
    return self._atom()

  def _atom(self) -> sympy.Expr:
    self._nest()
    try:
      return self._atom_inner()
    finally:
      self._nesting -= 1

  def _atom_inner(self) -> sympy.Expr:
    kind, token = self._next()
    if kind == "num":
      return self._number(token)
    if kind == "letter":
      return self._symbol(token)
    if token in ("(", "[", "{"):
      return self._group({"(": ")", "[": "]", "{": "}"}[token])
    if token == "|":
      self._abs_depth += 1
      value = self._group("|")
      self._abs_depth -= 1
      return sympy.Abs(value)
    if token == r"\frac":
      numerator = self._argument()
      return numerator / self._argument()
    if token == r"\binom":
      return _checked_binomial(self._argument(), self._argument())
    if token == r"\sqrt":
      index = sympy.Integer(2)
      if self._peek() == "[":
        self._next()
        index = self._group("]")
      return _checked_root(self._argument(), index)
    if token == r"\infty":
      return sympy.oo
    if token == r"\lfloor":
      return sympy.floor(self._group(r"\rfloor"))
    if token == r"\lceil":
      return sympy.ceiling(self._group(r"\rceil"))
    if kind == "cmd" and (token[1:] in _GREEK or token == r"\pi"):
      return self._symbol(token[1:])
    if kind == "cmd" and token[1:] in _FUNCTIONS:
      return self._function(token[1:])
    raise _ParseError(f"unsupported {token!r}")

  def _function(self, name: str) -> sympy.Expr:
    r"""`\name` applied to its argument, with `\log_b`, `\sin^2` and `\sin^{-1}` forms."""
    function, base, power = _FUNCTIONS[name], None, None
    if name == "log" and self._peek() == "_":
      self._next()
      base = self._argument()
    if self._peek() == "^":
      self._next()
      power = self._argument()
    if power == -1 and name in _INVERSES:
      function, power = _INVERSES[name], None
    if self._peek() in ("(", "{"):
      argument = self._group({"(": ")", "{": "}"}[self._next()[1]])
    else:
      argument = self._unary()
      while self._starts_factor() and self._peek()[1:] not in _FUNCTIONS:
        argument = argument * self._power()
    value = function(argument) if base is None else sympy.log(argument, base)
    return value if power is None else _checked_power(value, power)


def _checked_power(base: sympy.Expr, exponent: sympy.Expr) -> sympy.Expr:
  """base**exponent, unless its result would be unreasonably large.

  With a constant exponent e and a constant base b, the result may have at most
  _MAX_RESULT_BITS bits (about |e| * log2|b|); with a symbolic base, |e| <= _MAX_EXPONENT.
  """
  if exponent.is_number:
    size = abs(exponent) if exponent.is_Number else abs(sympy.N(exponent, 15))
    if size > 1:
      if base.is_Rational:
        bits = 0 if base in (0, 1, -1) else max(abs(base.p).bit_length(), base.q.bit_length())
      elif base.is_number:
        magnitude = sympy.N(sympy.Abs(base), 15)
        bits = 0 if magnitude == 0 else abs(sympy.log(magnitude)) / math.log(2) + 1
      else:
        bits = _MAX_RESULT_BITS / _MAX_EXPONENT
      if size * bits > _MAX_RESULT_BITS:
        raise _TooLarge("power too large")
  return sympy.Pow(base, exponent)


def _checked_root(radicand: sympy.Expr, index: sympy.Expr) -> sympy.Expr:
  """The index-th root; the real one for an odd index and a negative constant radicand."""
  if index.is_Integer and index % 2 == 1 and radicand.is_number and radicand.is_negative:
    return -_checked_power(-radicand, 1 / index)
  return _checked_power(radicand, 1 / index)


def _checked_factorial(value: sympy.Expr) -> sympy.Expr:
  """value!, for symbolic values and integers from 0 to _MAX_FACTORIAL."""
  if value.is_number:
    if not value.is_Integer or value < 0:
      raise _ParseError("factorial of a number that is not a natural number")
    if value > _MAX_FACTORIAL:
      raise _TooLarge("factorial too large")
  return sympy.factorial(value)


def _checked_binomial(n: sympy.Expr, k: sympy.Expr) -> sympy.Expr:
  """binomial(n, k), for symbolic values and numbers up to _MAX_FACTORIAL."""
  for value in (n, k):
    if value.is_number and (not value.is_finite or abs(value) > _MAX_FACTORIAL):
      raise _TooLarge("binomial too large")
  return sympy.binomial(n, k)


@dataclasses.dataclass(frozen=True)
class _Value:
  """A parsed answer.

  Attributes:
    kind: "expr" (parts = (expression,)), "rel" (parts = (_Relation,)), "seq" (bracketed
      items, in order), "set" (items in any order), "union" (`\\cup` operands, in any order) or
      "matrix" (parts = rows, each a tuple of _Value).
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
  """`expression`, or _ParseError if it is undefined (such as 1/0)."""
  if expression.has(sympy.zoo, sympy.nan):
    raise _ParseError("undefined value (division by zero)")
  return expression


def _parse_value(text: str) -> _Value:
  """Parses a normalised answer into a _Value (see its docstring)."""
  if not text:
    raise _ParseError("empty answer")
  if text in _EMPTY_SETS:
    return _Value("set", ())
  matrix = _MATRIX.fullmatch(text)
  if matrix:
    rows = [row for row in matrix.group(2).split("\\\\") if row]
    cells = tuple(tuple(_parse_value(cell) for cell in row.split("&")) for row in rows)
    if not cells or len({len(row) for row in cells}) != 1:
      raise _ParseError("ragged or empty matrix")
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
  parser = _Parser(text)
  parsed = parser.parse()
  if isinstance(parsed, _Relation):
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


def _relations_equal(r1: _Relation, r2: _Relation) -> bool:
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


def symbolic_equal(answer: str, reference: str) -> bool:
  """Symbolic equivalence of two normalised answers, in this process and without a time limit.

  Unparseable or unreasonably large answers are not equal to anything. `score` runs this in a
  worker process under a time limit; call it directly only on trusted input.
  """
  try:
    return _values_equal(_parse_value(answer), _parse_value(reference))
  except Exception:  # pylint: disable=broad-except  # Any failure to compare means "not equal".
    return False


# ---------------------------------------------------------------------------------------------
# Worker processes.


def _serve() -> None:
  """Worker main loop: one JSON request per stdin line, one JSON reply per line.

  A request is {"pairs": [[answer, reference], ...]}; the reply is {"equal": bool} (whether
  any pair is equivalent) or {"error": message} for a malformed request.
  """
  channel = os.fdopen(os.dup(1), "wb")
  os.dup2(2, 1)
  sys.stdout = sys.stderr
  try:
    import resource  # pylint: disable=import-outside-toplevel

    resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY_BYTES, _WORKER_MEMORY_BYTES))
  except (ImportError, ValueError, OSError):
    pass
  channel.write(b"ready\n")
  channel.flush()
  for line in sys.stdin.buffer:
    try:
      pairs = json.loads(line)["pairs"]
      reply = {"equal": any(symbolic_equal(str(a), str(b)) for a, b in pairs)}
    except (ValueError, KeyError, TypeError) as exc:
      reply = {"error": f"bad request: {type(exc).__name__}: {exc}"[:_MAX_FEEDBACK_CHARS]}
    channel.write(json.dumps(reply).encode("utf-8") + b"\n")
    channel.flush()


class _Worker:
  """One worker process running `_serve`, in its own process group."""

  def __init__(self):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    self._process = subprocess.Popen(
        [sys.executable, "-c", "from mopd_jax.verifiers.math import _serve; _serve()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=root,
        start_new_session=True,
    )
    self._buffer = b""
    try:
      ready = self._read_line(time.monotonic() + _STARTUP_TIMEOUT_S)
    except BaseException:
      self.kill()
      raise
    if ready != b"ready":
      self.kill()
      raise RuntimeError(f"Math worker did not start within {_STARTUP_TIMEOUT_S} s.")

  def alive(self) -> bool:
    return self._process.poll() is None

  def request(self, message: dict, timeout_s: float) -> dict | None:
    """The worker's reply to `message`, or None if none came within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    self._process.stdin.write(json.dumps(message).encode("utf-8") + b"\n")
    self._process.stdin.flush()
    line = self._read_line(deadline)
    return None if line is None else json.loads(line)

  def _read_line(self, deadline: float) -> bytes | None:
    """The next line from the worker, or None at the deadline."""
    descriptor = self._process.stdout.fileno()
    with selectors.DefaultSelector() as selector:
      selector.register(descriptor, selectors.EVENT_READ)
      while b"\n" not in self._buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
          return None
        if not selector.select(remaining):
          continue
        chunk = os.read(descriptor, 1 << 16)
        if not chunk:
          raise RuntimeError(f"Math worker exited unexpectedly ({self._process.poll()}).")
        self._buffer += chunk
    line, _, self._buffer = self._buffer.partition(b"\n")
    return line

  def kill(self) -> None:
    """Kills the worker's process group and reaps it."""
    try:
      os.killpg(self._process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass
    self._process.wait()
    for stream in (self._process.stdin, self._process.stdout):
      try:
        stream.close()
      except OSError:
        pass


class _WorkerPool:
  """At most `size` workers, started on demand; a worker that times out is killed."""

  def __init__(self, size: int):
    self.pid = os.getpid()
    self._slots = threading.BoundedSemaphore(size)
    self._lock = threading.Lock()
    self._idle: list[_Worker] = []
    self._workers: set[_Worker] = set()

  def _take(self) -> _Worker:
    with self._lock:
      while self._idle:
        worker = self._idle.pop()
        if worker.alive():
          return worker
        self._workers.discard(worker)
        worker.kill()
    worker = _Worker()
    with self._lock:
      self._workers.add(worker)
    return worker

  def _discard(self, worker: _Worker) -> None:
    with self._lock:
      self._workers.discard(worker)
    worker.kill()

  def run(self, message: dict, timeout_s: float) -> dict | None:
    """A worker's reply to `message`, or None if it did not answer within `timeout_s`."""
    with self._slots:
      worker = self._take()
      try:
        reply = worker.request(message, timeout_s)
      except BaseException:
        self._discard(worker)
        raise
      if reply is None:
        self._discard(worker)
        return None
      with self._lock:
        self._idle.append(worker)
      return reply

  def close(self) -> None:
    """Kills every worker."""
    with self._lock:
      workers, self._workers, self._idle = list(self._workers), set(), []
    for worker in workers:
      worker.kill()


_POOL: _WorkerPool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _WorkerPool:
  """The worker pool of this process (a forked child gets its own)."""
  global _POOL  # pylint: disable=global-statement
  with _POOL_LOCK:
    if _POOL is None or _POOL.pid != os.getpid():
      _POOL = _WorkerPool(max(1, min(os.cpu_count() or 1, 8)))
    return _POOL


@atexit.register
def _close_pool() -> None:
  if _POOL is not None and _POOL.pid == os.getpid():
    _POOL.close()


# ---------------------------------------------------------------------------------------------
# Scoring.


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


def _candidate_pairs(answer: str, reference: str) -> list[tuple[str, str]]:
  """(answer, reference) pairs to compare under the percent rule (module docstring)."""
  answer_percent, reference_percent = answer.endswith("%"), reference.endswith("%")
  answer = answer[:-1] if answer_percent else answer
  if not reference_percent:
    return [(answer, reference)]
  reference = reference[:-1]
  if answer_percent:
    return [(answer, reference)]
  return [(answer, reference), (answer, rf"\frac{{{reference}}}{{100}}")]


def _equivalent(answer: str, reference: str, time_limit_s: float) -> bool | None:
  """Whether two normalised answers match; None when the symbolic step timed out."""
  pending = []
  for a, r in _candidate_pairs(answer, reference):
    if a == r:
      return True
    if _is_text(a) or _is_text(r):
      if a.lower() == r.lower():
        return True
      continue
    numbers = _plain_number(a), _plain_number(r)
    if numbers[0] is not None and numbers[1] is not None:
      if _fractions_close(numbers[0][0], numbers[1][0], numbers[0][1] or numbers[1][1]):
        return True
      continue
    if a and r and len(a) <= _MAX_SYMBOLIC_CHARS and len(r) <= _MAX_SYMBOLIC_CHARS:
      pending.append((a, r))
  if not pending:
    return False
  reply = _pool().run({"pairs": pending}, time_limit_s)
  if reply is None:
    return None
  if "error" in reply:
    raise RuntimeError(f"Math worker failed: {reply['error']}")
  return bool(reply["equal"])


def _score(response: str, reference: Any, time_limit_s: float) -> Result:
  """`score` without the catch-all."""
  if not isinstance(time_limit_s, (int, float)) or not 0 < time_limit_s <= _MAX_TIME_LIMIT_S:
    raise ValueError(f"time_limit_s must be in (0, {_MAX_TIME_LIMIT_S}], got {time_limit_s!r}")
  gold = normalize_answer(_reference_answer(reference))
  if not isinstance(response, str):
    raise TypeError(f"response must be a string, got {type(response).__name__}")
  content, problem = _last_box(response)
  if content is None:
    return Result(0.0, problem, 0.0, "format_error")
  if len(content) > _MAX_ANSWER_CHARS:
    return Result(0.0, "", 0.0, "ok")
  verdict = _equivalent(normalize_answer(content), gold, time_limit_s)
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
    return Result(0.0, message[:_MAX_FEEDBACK_CHARS], 0.0, "error")


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
