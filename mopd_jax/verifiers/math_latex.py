"""LaTeX to sympy for the math verifier: a recursive-descent parser with size guards.

`Parser` converts one normalised answer, an expression or a relation between two expressions,
without `eval`; expressions that would be unreasonably expensive are rejected before they are
built. The supported syntax and the limits are described in the docstring of
`mopd_jax.verifiers.math`.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import re

import sympy

_MAX_NESTING = 60  # Counted twice per bracket level (operand and atom), so 30 levels.
_MAX_RESULT_BITS = 200_000
_MAX_EXPONENT = 10_000
_MAX_FACTORIAL = 10_000


class ParseError(ValueError):
  """The text is not an expression this converter understands."""


class TooLarge(ValueError):
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
class Relation:
  """`lhs op rhs` with op one of "=", "!=", "<", "<=" (">" and ">=" are swapped)."""

  op: str
  lhs: sympy.Expr
  rhs: sympy.Expr


class Parser:
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

  def parse(self) -> sympy.Expr | Relation:
    """The whole text as a sympy expression or a relation between two expressions."""
    left = self._expression()
    op = self._relation_op()
    if op is None:
      result = left
    else:
      right = self._expression()
      if op in (">", ">="):
        op, left, right = op.replace(">", "<"), right, left
      result = Relation(op, left, right)
    if self._position < len(self._tokens):
      raise ParseError(f"unexpected {self._peek()!r}")
    return result

  def _peek(self) -> str:
    return self._tokens[self._position][1] if self._position < len(self._tokens) else ""

  def _peek_kind(self) -> str:
    return self._tokens[self._position][0] if self._position < len(self._tokens) else "end"

  def _next(self) -> tuple[str, str]:
    if self._position >= len(self._tokens):
      raise ParseError("unexpected end of the expression")
    self._position += 1
    return self._tokens[self._position - 1]

  def _expect(self, *texts: str) -> None:
    token = self._next()[1]
    if token not in texts:
      raise ParseError(f"expected {' or '.join(texts)}, got {token!r}")

  def _nest(self) -> None:
    self._nesting += 1
    if self._nesting > _MAX_NESTING:
      raise TooLarge("nested too deeply")

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
    raise ParseError(f"unsupported {token!r}")

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
        raise TooLarge("power too large")
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
      raise ParseError("factorial of a number that is not a natural number")
    if value > _MAX_FACTORIAL:
      raise TooLarge("factorial too large")
  return sympy.factorial(value)


def _checked_binomial(n: sympy.Expr, k: sympy.Expr) -> sympy.Expr:
  """binomial(n, k), for symbolic values and numbers up to _MAX_FACTORIAL."""
  for value in (n, k):
    if value.is_number and (not value.is_finite or abs(value) > _MAX_FACTORIAL):
      raise TooLarge("binomial too large")
  return sympy.binomial(n, k)
