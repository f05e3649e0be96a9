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
   to sympy by the small parser of `math_latex` (fractions, roots, powers, `\cdot`, `\times`,
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
   then do not match anything, by this step or the next): more than 1000 characters, nesting
   deeper than about 30 brackets, a power of a constant whose result would have more than
   about 200,000 bits, a power of a non-constant expression with an exponent above 10,000,
   or a factorial or binomial of more than 10,000;
4. math-verify (the grader the MOPD authors used), in the same worker under the same limit,
   for pairs that step 3 did not find equal: it knows notation the parser above does not
   (`\gcd(4,6)`, `\max(1,2)`, ...). It sees the normalised answers, so the percent rule
   below still holds (see `math_verify_grader`).

Percent rule: a `%` (or `\%`) at the end of the response's answer is read as a unit and
dropped, so "50\%" matches a reference of 50 or "50\%". A reference ending in a percent x%
also accepts x/100, so 0.5 matches a reference of "50\%". A plain reference is never divided
by 100: "50\%" does not match a reference of 0.5.

References: a string, a number (int, float or Fraction), or a dict {"answer": ...} of those.
An invalid reference gives status "error" with the reason as feedback. Answers longer than
10,000 characters score 0 without being compared.
"""

from __future__ import annotations

import concurrent.futures
import decimal
import fractions
import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from mopd_jax.verifiers import math_worker
from mopd_jax.verifiers.math_answer import extract_boxed, is_text, last_box, normalize_answer
from mopd_jax.verifiers.math_equivalence import fractions_close, plain_number, symbolic_equal
from mopd_jax.verifiers.result import Result

__all__ = ["extract_boxed", "normalize_answer", "score", "score_batch", "symbolic_equal"]

_DEFAULT_TIME_LIMIT_S = 2.0
_MAX_TIME_LIMIT_S = 60.0
_MAX_ANSWER_CHARS = 10_000
_MAX_SYMBOLIC_CHARS = 1_000


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
    if is_text(a) or is_text(r):
      if a.lower() == r.lower():
        return True
      continue
    numbers = plain_number(a), plain_number(r)
    if numbers[0] is not None and numbers[1] is not None:
      if fractions_close(numbers[0][0], numbers[1][0], numbers[0][1] or numbers[1][1]):
        return True
      continue
    if a and r and len(a) <= _MAX_SYMBOLIC_CHARS and len(r) <= _MAX_SYMBOLIC_CHARS:
      pending.append((a, r))
  if not pending:
    return False
  reply = math_worker.pool().run({"pairs": pending}, time_limit_s)
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
  content, problem = last_box(response)
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
    return Result(0.0, message[: math_worker.MAX_FEEDBACK_CHARS], 0.0, "error")


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
