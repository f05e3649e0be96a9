"""The demo task's problem families (`mopd_jax.data.demo_problems` enumerates them).

Each family is one `return <body>` with an operator and integer constants: the correct
(operator, implementation) first, then the plausible mistakes that the demo base model's
misconceptions and `demo_problems.wrong_solution` draw from; `consts` gives each
constant's range and `cases` the test arguments for given constants. The order of the
table fixes every problem's id: append, never reorder.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

_K = range(2, 41)
_A = range(2, 10)


@dataclasses.dataclass(frozen=True)
class Family:
  """A problem family: `return <body>` with operator `op` and integer constants.

  `ops` lists (operator, implementation) pairs, the correct one first; the others are
  plausible mistakes used by `wrong_solution`. An implementation maps (argument,
  constants) to the return value. `cases(constants)` lists the test arguments.
  """

  name: str
  arg: str
  fn_names: tuple[str, ...]
  descriptions: tuple[str, ...]
  body: str
  ops: tuple[tuple[str, Callable[[Any, dict], Any]], ...]
  consts: tuple[tuple[str, range], ...]
  cases: Callable[[dict], list]


TABLE = (
    Family(
        "add",
        "x",
        ("add_const", "increase"),
        ("x plus {k}", "the sum of x and {k}"),
        "x {op} {k}",
        (
            ("+", lambda x, c: x + c["k"]),
            ("-", lambda x, c: x - c["k"]),
            ("*", lambda x, c: x * c["k"]),
        ),
        (("k", _K),),
        lambda c: [0, 1, 5, -3, 20],
    ),
    Family(
        "sub",
        "x",
        ("sub_const", "decrease"),
        ("x minus {k}", "{k} less than x"),
        "x {op} {k}",
        (
            ("-", lambda x, c: x - c["k"]),
            ("+", lambda x, c: x + c["k"]),
            ("*", lambda x, c: x * c["k"]),
        ),
        (("k", _K),),
        lambda c: [0, 1, 5, -3, 20],
    ),
    Family(
        "mul",
        "x",
        ("mul_const", "scale"),
        ("x times {k}", "the product of x and {k}"),
        "x {op} {k}",
        (
            ("*", lambda x, c: x * c["k"]),
            ("+", lambda x, c: x + c["k"]),
            ("-", lambda x, c: x - c["k"]),
        ),
        (("k", _K),),
        lambda c: [0, 1, 5, -3, 20],
    ),
    Family(
        "affine",
        "x",
        ("linear", "affine"),
        ("x times {a} plus {b}", "{a} times x plus {b}"),
        "x * {a} {op} {b}",
        (
            ("+", lambda x, c: x * c["a"] + c["b"]),
            ("-", lambda x, c: x * c["a"] - c["b"]),
            ("*", lambda x, c: x * c["a"] * c["b"]),
        ),
        (("a", _A), ("b", _K)),
        lambda c: [0, 1, 4, -2, 10],
    ),
    Family(
        "mod",
        "x",
        ("mod_const", "remainder"),
        ("x modulo {k}", "the remainder of x divided by {k}"),
        "x {op} {k}",
        (
            ("%", lambda x, c: x % c["k"]),
            ("//", lambda x, c: x // c["k"]),
            ("/", lambda x, c: x / c["k"]),
        ),
        (("k", _K),),
        lambda c: [c["k"] - 1, c["k"], 3 * c["k"] + 2, 100, -7],
    ),
    Family(
        "floordiv",
        "x",
        ("div_const", "int_div"),
        ("x divided by {k}, rounded down", "the floor division of x by {k}"),
        "x {op} {k}",
        (
            ("//", lambda x, c: x // c["k"]),
            ("%", lambda x, c: x % c["k"]),
            ("/", lambda x, c: x / c["k"]),
        ),
        (("k", _K),),
        lambda c: [c["k"] - 1, c["k"], 3 * c["k"] + 2, 100, -7],
    ),
    Family(
        "max",
        "x",
        ("max_const", "at_least"),
        ("the maximum of x and {k}", "the larger of x and {k}"),
        "{op}(x, {k})",
        (("max", lambda x, c: max(x, c["k"])), ("min", lambda x, c: min(x, c["k"]))),
        (("k", _K),),
        lambda c: [c["k"] - 1, c["k"] + 1, 0, 50, -5],
    ),
    Family(
        "min",
        "x",
        ("min_const", "at_most"),
        ("the minimum of x and {k}", "the smaller of x and {k}"),
        "{op}(x, {k})",
        (("min", lambda x, c: min(x, c["k"])), ("max", lambda x, c: max(x, c["k"]))),
        (("k", _K),),
        lambda c: [c["k"] - 1, c["k"] + 1, 0, 50, -5],
    ),
    Family(
        "absdiff",
        "x",
        ("abs_diff", "distance"),
        ("the absolute value of x minus {k}", "the distance between x and {k}"),
        "abs(x {op} {k})",
        (("-", lambda x, c: abs(x - c["k"])), ("+", lambda x, c: abs(x + c["k"]))),
        (("k", _K),),
        lambda c: [c["k"], 0, c["k"] + 3, -4, 50],
    ),
    Family(
        "square_plus",
        "x",
        ("square_plus", "sq_plus"),
        ("x squared plus {k}", "the square of x plus {k}"),
        "x * x {op} {k}",
        (
            ("+", lambda x, c: x * x + c["k"]),
            ("-", lambda x, c: x * x - c["k"]),
            ("*", lambda x, c: x * x * c["k"]),
        ),
        (("k", _K),),
        lambda c: [0, 1, 3, -2, 6],
    ),
    Family(
        "sum_plus",
        "xs",
        ("sum_plus", "total_plus"),
        ("the sum of the list xs plus {k}", "{k} plus the sum of the list xs"),
        "sum(xs) {op} {k}",
        (
            ("+", lambda xs, c: sum(xs) + c["k"]),
            ("-", lambda xs, c: sum(xs) - c["k"]),
            ("*", lambda xs, c: sum(xs) * c["k"]),
        ),
        (("k", _K),),
        lambda c: [[], [1, 2, 3], [5], [-4, 10, 7]],
    ),
    Family(
        "scale_list",
        "xs",
        ("scale_list", "times_each"),
        (
            "a list of each element of xs times {k}",
            "the list xs with every element multiplied by {k}",
        ),
        "[v {op} {k} for v in xs]",
        (
            ("*", lambda xs, c: [v * c["k"] for v in xs]),
            ("+", lambda xs, c: [v + c["k"] for v in xs]),
            ("-", lambda xs, c: [v - c["k"] for v in xs]),
        ),
        (("k", _K),),
        lambda c: [[], [1, 2, 3], [0, -5], [10]],
    ),
    Family(
        "count_gt",
        "xs",
        ("count_gt", "count_above"),
        (
            "the number of elements of xs greater than {k}",
            "how many elements of xs are greater than {k}",
        ),
        "len([v for v in xs if v {op} {k}])",
        (
            (">", lambda xs, c: len([v for v in xs if v > c["k"]])),
            (">=", lambda xs, c: len([v for v in xs if v >= c["k"]])),
            ("<", lambda xs, c: len([v for v in xs if v < c["k"]])),
        ),
        (("k", _K),),
        lambda c: [
            [],
            [c["k"] - 1, c["k"], c["k"] + 1],
            [c["k"] + 1, c["k"] + 2, 0],
            [1, 50, 100, -3],
        ],
    ),
    Family(
        "repeat_str",
        "s",
        ("repeat", "repeat_str"),
        ("the string s repeated {k} times", "{k} copies of the string s joined together"),
        "s {op} {k}",
        (("*", lambda s, c: s * c["k"]),),
        (("k", _K),),
        lambda c: ["ab", "", "xyz", "q"],
    ),
)
