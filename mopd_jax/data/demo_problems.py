"""A small, parametrised family of Python function-writing problems with unit tests.

The demo task for training a tiny language model on a CPU: every prompt is one short
sentence and every reference response is a fenced code block holding a two-line function:

  prompt:   Write a Python function add_const(x) that returns x plus 7.
  solution: ```python
            def add_const(x):
                return x + 7
            ```

Problems are enumerated explicitly (family x function name x phrasing x constants) and
put in a fixed pseudo-random order, so problem ids are stable across processes and
machines. The held-out split is a fixed integer hash of the problem's (family,
constants) group: a held-out task never shares its family and constants with a
training task, whatever the function name or phrasing.

`tests` of a problem is the reference format of `mopd_jax.verifiers.code`:
{"fn_name": name, "inputs": [[arg], ...], "outputs": [value, ...]}.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import numpy as np

from mopd_jax.data.demo_families import TABLE as _FAMILIES

SPLITS = ("train", "heldout")
MAX_MISCONCEPTIONS = 3  # systematic wrong answers per problem (see `misconceptions`)

_ORDER_SEED = 20240611
_HELDOUT_PERCENT = 10
_LEADS = (
    "Write a Python function {sig} that returns {desc}.",
    "Define a Python function {sig} returning {desc}.",
)


@dataclasses.dataclass(frozen=True)
class Problem:
  """One demo problem: prompt, reference response, unit tests and split."""

  id: int
  prompt: str
  solution: str
  tests: dict
  split: str


FAMILIES = tuple(family.name for family in _FAMILIES)


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Coordinates of one problem: family, function name, phrasing and constants."""

  family: int
  fn_name: int
  phrasing: int
  consts: tuple[int, ...]


def _family_specs(index: int) -> list[_Spec]:
  """All problems of family `index`, in a fixed order."""
  family = _FAMILIES[index]
  ranges = [values for _, values in family.consts]
  return [
      _Spec(index, name, phrasing, tuple(consts))
      for name in range(len(family.fn_names))
      for phrasing in range(len(family.descriptions))
      for consts in itertools.product(*ranges)
  ]


@functools.lru_cache(maxsize=1)
def _specs() -> tuple[_Spec, ...]:
  """Every problem, in the fixed pseudo-random order that defines the problem ids."""
  ordered = [spec for index in range(len(_FAMILIES)) for spec in _family_specs(index)]
  order = np.random.default_rng(_ORDER_SEED).permutation(len(ordered))
  return tuple(ordered[i] for i in order)


def _check_id(i: int) -> int:
  """Returns `i` as an int, or raises ValueError if it is not a valid problem id."""
  if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
    raise ValueError(f"Problem id must be an integer, got {i!r}.")
  if not 0 <= i < num_problems():
    raise ValueError(f"Problem id {i} is out of range [0, {num_problems()}).")
  return int(i)


def _const_dict(spec: _Spec) -> dict:
  """Maps the family's constant names to the values of `spec`."""
  names = [name for name, _ in _FAMILIES[spec.family].consts]
  return dict(zip(names, spec.consts))


def _group_hash(spec: _Spec) -> int:
  """A fixed 32-bit multiplicative hash of the (family, constants) group of `spec`."""
  key = spec.family
  for value in spec.consts:
    key = key * 64 + value
  return (key * 2654435761) % 2**32


def _split(spec: _Spec) -> str:
  """The split of a problem: about `_HELDOUT_PERCENT`% of groups are held out."""
  return "heldout" if _group_hash(spec) * 100 < _HELDOUT_PERCENT * 2**32 else "train"


def _prompt(spec: _Spec) -> str:
  """The one-sentence task statement of `spec`."""
  family = _FAMILIES[spec.family]
  signature = f"{family.fn_names[spec.fn_name]}({family.arg})"
  description = family.descriptions[spec.phrasing].format(**_const_dict(spec))
  return _LEADS[spec.phrasing].format(sig=signature, desc=description)


def format_response(code: str) -> str:
  """Wraps Python source in a ```python fenced block (the demo response format)."""
  newline = "\n"
  return f"```python\n{code.strip(newline)}\n```"


def _render(spec: _Spec, op: str, consts: dict) -> str:
  """The response defining the problem's function with operator `op` and `consts`."""
  family = _FAMILIES[spec.family]
  body = family.body.format(op=op, **consts)
  name = family.fn_names[spec.fn_name]
  return format_response(f"def {name}({family.arg}):\n    return {body}")


def _tests(spec: _Spec) -> dict:
  """Unit tests of `spec` in the call-based format of the code verifier."""
  family = _FAMILIES[spec.family]
  consts = _const_dict(spec)
  compute = family.ops[0][1]
  cases = family.cases(consts)
  return {
      "fn_name": family.fn_names[spec.fn_name],
      "inputs": [[arg] for arg in cases],
      "outputs": [compute(arg, consts) for arg in cases],
  }


def num_problems() -> int:
  """Number of demo problems; ids are 0 .. num_problems() - 1."""
  return len(_specs())


def family_of(i: int) -> str:
  """Name of the family (one of `FAMILIES`) of problem `i`."""
  return _FAMILIES[_specs()[_check_id(i)].family].name


def get_problem(i: int) -> Problem:
  """Problem number `i` (deterministic: the same text in every process)."""
  i = _check_id(i)
  spec = _specs()[i]
  family = _FAMILIES[spec.family]
  return Problem(
      id=i,
      prompt=_prompt(spec),
      solution=_render(spec, family.ops[0][0], _const_dict(spec)),
      tests=_tests(spec),
      split=_split(spec),
  )


@functools.lru_cache(maxsize=len(SPLITS))
def _split_ids(split: str) -> tuple[int, ...]:
  """Ids of the problems in `split`, ascending."""
  return tuple(i for i, spec in enumerate(_specs()) if _split(spec) == split)


def problem_ids(split: str) -> np.ndarray:
  """Sorted int64 ids of the problems in `split` ("train" or "heldout")."""
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; allowed: {SPLITS}.")
  return np.asarray(_split_ids(split), dtype=np.int64)


def _mutations(spec: _Spec) -> tuple[list, list]:
  """(operator swaps, single-constant changes) of `spec`, as (op, constants) pairs."""
  family = _FAMILIES[spec.family]
  consts = _const_dict(spec)
  swaps = [(op, consts) for op, _ in family.ops[1:]]
  changes = [
      (family.ops[0][0], {**consts, name: value})
      for name, values in family.consts
      for value in values
      if value != consts[name]
  ]
  return swaps, changes


def _fails_tests(spec: _Spec, op: str, consts: dict) -> bool:
  """True if the function with operator `op` and `consts` fails a test of `spec`."""
  family = _FAMILIES[spec.family]
  compute = dict(family.ops)[op]
  tests = _tests(spec)
  for (arg,), expected in zip(tests["inputs"], tests["outputs"]):
    try:
      if compute(arg, consts) != expected:
        return True
    except Exception:  # pylint: disable=broad-except  # Raising fails the test too.
      return True
  return False


def wrong_solution(problem: Problem, rng: np.random.Generator) -> str:
  """A plausible but wrong response to `problem`: same form, one mistake.

  With probability 1/2 (when the family has alternative operators) the operator is
  swapped, otherwise one constant is changed to another value of its range. The result
  always fails at least one of the problem's tests.
  """
  if not isinstance(problem, Problem) or problem != get_problem(problem.id):
    raise ValueError(f"{problem!r} is not a demo problem of this module.")
  spec = _specs()[problem.id]
  swaps, changes = _mutations(spec)
  swaps = [swaps[j] for j in rng.permutation(len(swaps))]
  changes = [changes[j] for j in rng.permutation(len(changes))]
  candidates = swaps + changes if swaps and rng.random() < 0.5 else changes + swaps
  for op, consts in candidates:
    if _fails_tests(spec, op, consts):
      return _render(spec, op, consts)
  raise RuntimeError(f"Problem {problem.id} has no failing variant; its tests are too weak.")


def _misconception_candidates(spec: _Spec) -> list:
  """(op, constants) of every systematic misconception a learner could hold about `spec`:
  each alternative operator of the family (copying the constants right); a family
  without one (`repeat_str`) gets the constant off by +1 and by -1."""
  family = _FAMILIES[spec.family]
  consts = _const_dict(spec)
  candidates = [(op, consts) for op, _ in family.ops[1:]]
  if not candidates:
    last = family.consts[-1][0]
    candidates = [(family.ops[0][0], {**consts, last: consts[last] + d}) for d in (1, -1)]
  return candidates


def _compute(spec: _Spec, op: str, consts: dict, arg):
  return dict(_FAMILIES[spec.family].ops)[op](arg, consts)


@functools.lru_cache(maxsize=4096)
def _misconceptions(i: int) -> tuple[tuple[str, tuple], ...]:
  spec = _specs()[i]
  tests = _tests(spec)
  out = []
  for op, consts in _misconception_candidates(spec):
    if len(out) == MAX_MISCONCEPTIONS:
      break
    if _fails_tests(spec, op, consts):
      values = tuple(_compute(spec, op, consts, arg) for (arg,) in tests["inputs"])
      out.append((_render(spec, op, consts), values))
  return tuple(out)


def misconceptions(problem: Problem) -> tuple[str, ...]:
  """The problem's systematic wrong answers, in a fixed order (at most MAX_MISCONCEPTIONS).

  Unlike `wrong_solution`'s scattered mistakes, these are the few errors a learner of the
  family makes again and again: another operator of the family (`x - 7` for "x plus 7",
  `x / 13` for "x divided by 13, rounded down"); only `repeat_str`, which has no other
  operator, gets the count off by one. Each fails at least one of the problem's tests;
  every problem has at least one.
  """
  if not isinstance(problem, Problem) or problem != get_problem(problem.id):
    raise ValueError(f"{problem!r} is not a demo problem of this module.")
  return tuple(response for response, _ in _misconceptions(problem.id))


def misconception_outputs(problem: Problem, index: int) -> list:
  """What misconception `index` of `problem` returns on each of the problem's test inputs."""
  misconceptions(problem)  # validates the problem
  return list(_misconceptions(problem.id)[index][1])


def style_of(i: int) -> int:
  """The surface form of problem `i` within its family, 0..3: function name x phrasing."""
  spec = _specs()[_check_id(i)]
  return spec.fn_name * len(_LEADS) + spec.phrasing


def family_index(i: int) -> int:
  """Index of problem `i`'s family in `FAMILIES`."""
  return _specs()[_check_id(i)].family
