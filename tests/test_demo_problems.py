"""Tests for mopd_jax.data.demo_problems, graded with the code verifier."""

import collections
import dataclasses
import hashlib
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from mopd_jax.data import demo_problems as dp
from mopd_jax.verifiers import code

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
RESPONSE_FORM = re.compile(r"```python\ndef (\w+)\((\w+)\):\n    return [^\n]+\n```")


def ids_by_family():
  groups = collections.defaultdict(list)
  for i in range(dp.num_problems()):
    groups[dp.family_of(i)].append(i)
  return groups


def sample_ids(per_family):
  """The first `per_family` ids of every family (a deterministic spread sample)."""
  return [i for ids in ids_by_family().values() for i in ids[:per_family]]


def problems_digest():
  """SHA-256 of every problem's full content, in id order."""
  texts = (
      json.dumps(dataclasses.asdict(dp.get_problem(i)), sort_keys=True)
      for i in range(dp.num_problems())
  )
  return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def test_size_and_distinct_prompts():
  n = dp.num_problems()
  assert n >= 3000
  prompts = [dp.get_problem(i).prompt for i in range(n)]
  assert len(set(prompts)) == n
  assert max(len(p.split()) for p in prompts) <= 25
  assert set(ids_by_family()) == set(dp.FAMILIES)


def test_problem_shape():
  for i in sample_ids(5):
    problem = dp.get_problem(i)
    assert problem.id == i and problem.split in dp.SPLITS
    match = RESPONSE_FORM.fullmatch(problem.solution)
    assert match, problem.solution
    tests = problem.tests
    assert tests["fn_name"] == match.group(1)
    assert f"{match.group(1)}({match.group(2)})" in problem.prompt
    assert 4 <= len(tests["inputs"]) == len(tests["outputs"]) <= 6
    assert all(isinstance(args, list) and len(args) == 1 for args in tests["inputs"])
    assert json.loads(json.dumps(tests)) == tests
    assert dp.format_response(code.extract_code(problem.solution)) == problem.solution


def test_deterministic_within_and_across_processes():
  assert dp.get_problem(17) == dp.get_problem(17)
  script = "from tests.test_demo_problems import problems_digest; " "print(problems_digest())"
  child = subprocess.run(
      [sys.executable, "-c", script],
      cwd=REPO_ROOT,
      check=True,
      capture_output=True,
      text=True,
      env={"PYTHONHASHSEED": "123"},
  )
  assert child.stdout.strip() == problems_digest()


def test_splits_disjoint_cover_all_and_heldout_spread():
  train, heldout = dp.problem_ids("train"), dp.problem_ids("heldout")
  assert train.dtype == heldout.dtype == np.int64
  assert not set(train.tolist()) & set(heldout.tolist())
  assert sorted(train.tolist() + heldout.tolist()) == list(range(dp.num_problems()))
  assert 0.05 <= len(heldout) / dp.num_problems() <= 0.15
  assert {dp.family_of(int(i)) for i in heldout} == set(dp.FAMILIES)
  assert all(dp.get_problem(int(i)).split == "heldout" for i in heldout[:50])


def test_invalid_arguments():
  with pytest.raises(ValueError, match=str(dp.num_problems())):
    dp.get_problem(dp.num_problems())
  with pytest.raises(ValueError, match="-1"):
    dp.get_problem(-1)
  with pytest.raises(ValueError, match="'test'"):
    dp.problem_ids("test")
  problem = dp.get_problem(0)
  altered = dp.Problem(problem.id, "other prompt", problem.solution, problem.tests, problem.split)
  with pytest.raises(ValueError, match="not a demo problem"):
    dp.wrong_solution(altered, np.random.default_rng(0))


def test_solutions_pass_their_tests():
  ids = sample_ids(11)
  assert len(ids) >= 150
  problems = [dp.get_problem(i) for i in ids]
  results = code.score_batch([p.solution for p in problems], [p.tests for p in problems])
  failed = [(p.id, r) for p, r in zip(problems, results) if r.reward != 1.0]
  assert not failed


def test_wrong_solutions_fail_their_tests():
  rng = np.random.default_rng(0)
  problems = [dp.get_problem(i) for i in sample_ids(8)]
  wrong = [dp.wrong_solution(p, rng) for p in problems]
  assert len(wrong) >= 100
  for problem, response in zip(problems, wrong):
    assert response != problem.solution
    assert RESPONSE_FORM.fullmatch(response)
    assert response.split("\n")[1] == problem.solution.split("\n")[1]
  results = code.score_batch(wrong, [p.tests for p in problems])
  passed = [(p.id, w) for p, w, r in zip(problems, wrong, results) if r.reward != 0.0]
  assert not passed
  assert all(r.status == "ok" for r in results)


def test_wrong_solution_exists_for_every_problem_and_is_seeded():
  rng = np.random.default_rng(1)
  for i in range(dp.num_problems()):
    assert dp.wrong_solution(dp.get_problem(i), rng) != dp.get_problem(i).solution
  problem = dp.get_problem(5)
  first = [dp.wrong_solution(problem, np.random.default_rng(s)) for s in range(20)]
  again = [dp.wrong_solution(problem, np.random.default_rng(s)) for s in range(20)]
  assert first == again and len(set(first)) > 1


def test_misconceptions_fail_with_the_feedback_grade_outputs_predicts():
  problems = [dp.get_problem(i) for i in sample_ids(3)]
  cases = [(p, j, w) for p in problems for j, w in enumerate(dp.misconceptions(p))]
  assert all(1 <= len(dp.misconceptions(p)) <= dp.MAX_MISCONCEPTIONS for p in problems)
  results = code.score_batch([w for _, _, w in cases], [p.tests for p, _, _ in cases])
  for (problem, j, wrong), result in zip(cases, results):
    assert RESPONSE_FORM.fullmatch(wrong) and wrong != problem.solution
    assert result.reward == 0.0 and result.status == "ok"
    predicted = code.grade_outputs(dp.misconception_outputs(problem, j), problem.tests)
    assert predicted == result
  assert dp.misconceptions(problems[0]) == dp.misconceptions(dp.get_problem(problems[0].id))
  styles = {(dp.family_index(i), dp.style_of(i)) for i in range(dp.num_problems())}
  assert len(styles) == 4 * len(dp.FAMILIES)
