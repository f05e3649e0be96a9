"""Tests for mopd_jax.verifiers.code: extraction, grading, and attempts to cheat."""

import json
import time

import pytest

from mopd_jax.verifiers import code
from mopd_jax.verifiers.result import Result

CALL_REF = {"fn_name": "add3", "inputs": [[0], [1], [5], [-3]], "outputs": [3, 4, 8, 0]}
STDIO_REF = {"inputs": ["2 3\n", "10 -4\n", "0 0"], "outputs": ["5\n", "6", "0\n"]}


def fenced(source):
  return f"Here you go:\n```python\n{source}\n```\n"


def test_extract_code_takes_longest_block():
  response = (
      "```\nshort\n```\ntext\n```python3\nthe longest block\nof code\n```\n"
      "```py\nmedium one\n```"
  )
  assert code.extract_code(response) == "the longest block\nof code\n"


def test_extract_code_without_block_or_with_empty_block():
  assert code.extract_code("def f(x): return x") is None
  assert code.extract_code("```python\n   \n```") is None
  assert code.extract_code("```python\ndef f(x): return x") is None


def test_call_based_correct_and_incorrect():
  good = code.score(fenced("def add3(x):\n    return x + 3"), CALL_REF)
  assert good == Result(1.0, "", 1.0, "ok")
  bad = code.score(fenced("def add3(x):\n    return x + 3 if x > 0 else 0"), CALL_REF)
  assert bad.reward == 0.0 and bad.status == "ok"
  assert bad.accuracy == pytest.approx(0.75)
  assert "input: [0]" in bad.feedback and "expected: 3" in bad.feedback


def test_reference_as_json_text_and_kwargs_inputs():
  ref = json.dumps(
      {"fn_name": "f", "inputs": [{"a": 1, "b": 2}, [3, 4]], "outputs": [[1, 2], [3, 4]]}
  )
  assert code.score(fenced("def f(a, b):\n    return (a, b)"), ref).reward == 1.0


def test_floats_with_tolerance_ints_exact_bools_strict():
  ref = {"fn_name": "f", "inputs": [[1], [2]], "outputs": [0.1, 0.2]}
  assert code.score(fenced("def f(x):\n    return x * 0.1 + 1e-12"), ref).reward == 1.0
  assert code.score(fenced("def f(x):\n    return x * 0.1 + 1e-3"), ref).reward == 0.0
  ref = {"fn_name": "f", "inputs": [[1]], "outputs": [True]}
  assert code.score(fenced("def f(x):\n    return 1"), ref).reward == 0.0
  assert code.score(fenced("def f(x):\n    return x == 1"), ref).reward == 1.0


def test_stdio_correct_and_incorrect():
  good = "a, b = map(int, input().split())\nprint(a + b)"
  assert code.score(fenced(good), STDIO_REF).reward == 1.0
  fast_io = (
      "import sys\na, b = map(int, sys.stdin.buffer.read().split())\n"
      "sys.stdout.write(f'  {a + b}  \\n\\n')\nsys.exit(0)"
  )
  assert code.score(fenced(fast_io), STDIO_REF).reward == 1.0
  bad = code.score(fenced("a, b = map(int, input().split())\nprint(a - b)"), STDIO_REF)
  assert bad.reward == 0.0 and bad.status == "ok"
  assert bad.accuracy == pytest.approx(1 / 3)


def test_fake_pass_messages_and_early_exit_score_zero():
  forged = json.dumps({"results": [{"ok": True, "value": v} for v in [3, 4, 8, 0]]})
  program = (
      "import sys\n"
      f"print('all tests passed')\nprint({forged!r})\nsys.exit(0)\n"
      "def add3(x):\n    return x + 3"
  )
  result = code.score(fenced(program), CALL_REF)
  assert result.reward == 0.0 and result.accuracy == 0.0


def test_os_exit_scores_zero():
  program = "import os\ndef add3(x):\n    print('PASS')\n    os._exit(0)"
  result = code.score(fenced(program), CALL_REF)
  assert result.reward == 0.0 and result.status == "ok"
  assert "exited before returning: exit status 0" in result.feedback


def test_eq_overriding_return_value_scores_zero():
  program = (
      "class Anything:\n    def __eq__(self, other):\n        return True\n"
      "def add3(x):\n    return Anything()"
  )
  result = code.score(fenced(program), CALL_REF)
  assert result.reward == 0.0 and "not JSON serializable" in result.feedback


def test_infinite_loop_times_out_quickly():
  start = time.monotonic()
  result = code.score(
      fenced("def add3(x):\n    while True:\n        pass"), CALL_REF, time_limit_s=1.0
  )
  assert time.monotonic() - start < 1.0 + 2.0
  assert result.status == "timeout" and result.reward == 0.0


def test_program_ignoring_the_alarm_is_killed():
  program = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n" "while True:\n    pass"
  ref = {"fn_name": "f", "inputs": [[1]], "outputs": [1]}
  start = time.monotonic()
  result = code.score(fenced(program), ref, time_limit_s=0.5)
  assert time.monotonic() - start < 1.5 + 2.0
  assert result.status == "timeout" and result.reward == 0.0


def test_no_code_block_is_format_error():
  result = code.score("def add3(x):\n    return x + 3", CALL_REF)
  assert result.status == "format_error" and result.reward == 0.0


def test_syntax_error_is_format_error():
  result = code.score(fenced("def add3(x:\n    return x"), CALL_REF)
  assert result.status == "format_error" and "SyntaxError" in result.feedback


def test_exception_in_program_reported():
  result = code.score(fenced("def add3(x):\n    return 1 // (x - 1)"), CALL_REF)
  assert result.reward == 0.0 and result.status == "ok"
  assert "ZeroDivisionError" in result.feedback
  missing = code.score(fenced("def other(x):\n    return x + 3"), CALL_REF)
  assert "'add3' is not defined" in missing.feedback


def test_feedback_is_bounded_and_names_failing_input():
  ref = {"fn_name": "f", "inputs": [["x" * 5000], ["y"]], "outputs": ["z" * 5000, "w"]}
  result = code.score(fenced("def f(s):\n    return s * 3"), ref)
  assert result.reward == 0.0 and len(result.feedback) <= 2000
  assert 'input: ["xxx' in result.feedback and 'input: ["y"]' in result.feedback


def test_parent_environment_is_hidden(monkeypatch):
  secret = "s3cr3t-token-value"
  monkeypatch.setenv("MOPD_FAKE_SECRET", secret)
  ref = {"fn_name": "f", "inputs": [[0]], "outputs": ["absent"]}
  lookup = "import os\ndef f(x):\n" "    return os.environ.get('MOPD_FAKE_SECRET', 'absent')"
  assert code.score(fenced(lookup), ref).reward == 1.0
  dump = "import os\ndef f(x):\n    return repr(dict(os.environ))"
  result = code.score(fenced(dump), ref)
  assert result.reward == 0.0 and "got:" in result.feedback
  assert secret not in result.feedback


def test_invalid_reference_is_verifier_error_not_exception():
  for reference in [
      {"inputs": [[1]]},
      "not json",
      {"fn_name": "f", "inputs": [1], "outputs": [1]},
      None,
  ]:
    result = code.score(fenced("def f(x):\n    return x"), reference)
    assert result.status == "error" and result.reward == 0.0
  assert code.score(None, CALL_REF).status == "error"


def test_score_batch_keeps_order():
  responses = [fenced(f"def add3(x):\n    return x + {k}") for k in [3, 2, 3, 4, 3]]
  results = code.score_batch(responses, [CALL_REF] * 5, max_workers=3)
  assert [r.reward for r in results] == [1.0, 0.0, 1.0, 0.0, 1.0]
  assert code.score_batch([], []) == []
  with pytest.raises(ValueError, match="2 responses but 1 references"):
    code.score_batch(responses[:2], [CALL_REF])
  with pytest.raises(ValueError, match="max_workers"):
    code.score_batch(responses, [CALL_REF] * 5, max_workers=0)


def test_result_rejects_unknown_status():
  with pytest.raises(ValueError, match="'passed'"):
    Result(1.0, status="passed")


def test_int_outputs_are_exact_float_outputs_tolerant():
  big = 3**100
  ref = {"fn_name": "f", "inputs": [[100]], "outputs": [big]}
  assert code.score(fenced("def f(n):\n    return 3 ** n"), ref).reward == 1.0
  assert code.score(fenced("def f(n):\n    return 3.0 ** n"), ref).reward == 0.0
  ref = {"fn_name": "f", "inputs": [[3]], "outputs": [3]}
  assert code.score(fenced("def f(n):\n    return float(n)"), ref).reward == 1.0
  ref = {"fn_name": "f", "inputs": [[3]], "outputs": [3.0]}
  assert code.score(fenced("def f(n):\n    return n"), ref).reward == 1.0


def test_leetcode_style_solution_class():
  ref = {"fn_name": "addThree", "inputs": [[1], [2]], "outputs": [4, 5]}
  program = "class Solution:\n    def addThree(self, x):\n        return x + 3"
  assert code.score(fenced(program), ref).reward == 1.0
  other = "class Solution:\n    def other(self, x):\n        return x + 3"
  assert "'addThree' is not defined" in code.score(fenced(other), ref).feedback


def test_leetcode_style_program_has_typing_names_and_common_modules():
  ref = {"fn_name": "topTwo", "inputs": [[[3, 1, 4, 1, 5]]], "outputs": [[5, 4]]}
  program = ("class Solution:\n"
             "    def topTwo(self, nums: List[int]) -> Optional[List[int]]:\n"
             "        return heapq.nlargest(2, collections.Counter(nums))")
  assert code.score(fenced(program), ref).reward == 1.0
  stdin_ref = {"inputs": ["1\n"], "outputs": ["1\n"]}
  unimported = code.score(fenced("print(int(input()), List)"), stdin_ref)
  assert unimported.reward == 0.0 and "NameError" in unimported.feedback


def test_stdio_reads_fd_zero_and_reports_runtime_errors():
  ref = {"inputs": ["3\n1 2 3\n"], "outputs": ["6\n"]}
  assert code.score(fenced("print(sum(map(int, open(0).read().split()[1:])))"), ref).reward == 1.0
  crash = code.score(fenced("n = int(input())\nprint(int('x'))"), ref)
  assert crash.reward == 0.0 and crash.status == "ok"
  assert "exit status 1: ValueError: invalid literal for int()" in crash.feedback
  exit_code = code.score(fenced("print(6)\nraise SystemExit(3)"), ref)
  assert exit_code.reward == 0.0 and "SystemExit: 3" in exit_code.feedback


def test_each_test_runs_in_a_fresh_process_sharing_one_working_directory():
  ref = {"fn_name": "f", "inputs": [[1], [1]], "outputs": [1, 1]}
  program = "seen = []\ndef f(x):\n    seen.append(x)\n    return len(seen)"
  assert code.score(fenced(program), ref).reward == 1.0  # Module state starts afresh.
  counter = "open('count', 'a').write('x')\nprint(len(open('count').read()))"
  two_tests = code.score(fenced(counter), {"inputs": ["", ""], "outputs": ["1", "2"]})
  assert two_tests.reward == 1.0  # Files persist across the tests of one response...
  assert code.score(fenced(counter), {"inputs": [""], "outputs": ["1"]}).reward == 1.0  # ...only.


def test_output_over_the_limit_fails():
  ref = {"inputs": [""], "outputs": ["x"]}
  result = code.score(fenced("print('x' * (2 << 20))"), ref)
  assert result.reward == 0.0 and "output too large" in result.feedback


def test_score_batch_deadline_cuts_unfinished_responses():
  sleeper = fenced("import time\ntime.sleep(30)")
  good = fenced("print(input())")
  ref = {"inputs": ["hi\n"], "outputs": ["hi"]}
  responses = [good, good, sleeper, sleeper, sleeper, sleeper]
  start = time.monotonic()
  results, stats = code.score_batch_with_stats(
      responses, [ref] * 6, max_workers=2, time_limit_s=5.0, deadline_s=1.5
  )
  elapsed = time.monotonic() - start
  assert elapsed < 1.5 + 1.0
  assert [r.reward for r in results] == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
  assert [r.status for r in results[2:]] == ["timeout"] * 4
  assert stats["verify/timeouts"] == 4.0
  with pytest.raises(ValueError, match="deadline_s must be positive"):
    code.score_batch(responses, [ref] * 6, deadline_s=0)


def test_score_batch_with_stats_counts_outcomes():
  responses = [
      fenced("def add3(x):\n    return x + 3"),
      "no code here",
      fenced("def add3(x:\n    return x"),
      fenced("def add3(x):\n    while True:\n        pass"),
      fenced("def add3(x):\n    return x + 3"),
  ]
  references = [CALL_REF, CALL_REF, CALL_REF, CALL_REF, {"inputs": "not a list"}]
  results, stats = code.score_batch_with_stats(responses, references, time_limit_s=0.5)
  assert [r.status for r in results] == ["ok", "format_error", "format_error", "timeout", "error"]
  assert stats["verify/timeouts"] == 1.0
  assert stats["verify/errors"] == 1.0
  assert stats["verify/format_errors"] == 2.0
  assert 0.3 < stats["verify/mean_time_s"] < 1.5  # The timeout (1.5 s) dominates the mean.
  assert set(stats) == {
      "verify/timeouts",
      "verify/errors",
      "verify/format_errors",
      "verify/mean_time_s",
  }
  assert code.score_batch_with_stats([], [])[1]["verify/mean_time_s"] == 0.0
