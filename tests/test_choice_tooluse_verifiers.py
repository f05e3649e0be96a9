"""Tests for mopd_jax.verifiers.choice and mopd_jax.verifiers.tooluse."""

import json

import pytest

from mopd_jax.verifiers import choice, tooluse
from mopd_jax.verifiers.result import Result

CORRECT = Result(1.0, "", 1.0, "ok")
WRONG = Result(0.0, "", 0.0, "ok")

# Multiple choice.


@pytest.mark.parametrize(
    "answer", ["B", " B ", "b", "(B)", "B.", "(b).", "\n( B )\n"], ids=lambda text: repr(text)
)
def test_choice_correct_forms(answer):
  assert choice.score(f"Reasoning...\n<answer>{answer}</answer>", "B") == CORRECT


@pytest.mark.parametrize("answer", ["C", "B and C", "Option B", "B)", "BB"])
def test_choice_wrong(answer):
  assert choice.score(f"<answer>{answer}</answer>", "B") == WRONG


def test_choice_last_tag_wins():
  response = "<answer>A</answer> Wait, no. <ANSWER>C</ANSWER>"
  assert choice.score(response, "C") == CORRECT
  assert choice.score(response, "A") == WRONG
  assert choice.extract_answer("<answer>A</answer> <answer>unclosed") == "A"


@pytest.mark.parametrize(
    "response, reason",
    [
        ("The answer is B.", "No <answer>"),
        ("<answer>B", "No <answer>"),
        ("B</answer>", "No <answer>"),
        ("<answer> () </answer>", "empty"),
    ],
)
def test_choice_format_errors(response, reason):
  result = choice.score(response, "B")
  assert result.reward == 0.0 and result.status == "format_error"
  assert reason in result.feedback


def test_choice_reference_forms_and_invalid_reference():
  assert choice.score("<answer>d</answer>", {"answer": "(D)"}) == CORRECT
  for reference in ("AB", "", None, 3, {"letter": "A"}):
    result = choice.score("<answer>A</answer>", reference)
    assert result.status == "error" and result.reward == 0.0 and result.feedback


def test_choice_score_batch():
  results = choice.score_batch(["<answer>A</answer>", "<answer>B</answer>", "A"], ["A"] * 3)
  assert [r.reward for r in results] == [1.0, 0.0, 0.0]
  assert results[2].status == "format_error"
  with pytest.raises(ValueError):
    choice.score_batch(["x"], [])


# Tool use.

REFERENCE = {
    "actions": ["searchFlights", "getWeather"],
    "inputs": [{"from": "SFO", "to": "JFK"}, {"city": "New York", "days": 3}],
}


def react(*steps):
  """A ReAct response with one Thought/Action/Action Input block per (name, input text)."""
  blocks = [
      f"Thought: I need {name}.\nAction: {name}\nAction Input: {text}" for name, text in steps
  ]
  return "\n".join(blocks) + "\nObservation: ...\nFinal Answer: done"


def test_tooluse_correct_any_order_and_multiline_json():
  response = react(
      ("getWeather", '{"city": "New York",\n "days": 3}'),
      ("searchFlights", '{\n  "from": "SFO",\n  "to": "JFK"\n}\nSome trailing words.'),
  )
  assert tooluse.score(response, REFERENCE) == CORRECT
  assert tooluse.score(response, json.dumps(REFERENCE)) == CORRECT


def test_tooluse_inputs_merged_in_order():
  response = react(
      ("searchFlights", '{"from": "LAX", "to": "JFK"}'),
      ("getWeather", '{"city": "New York"}'),
      ("getWeather", '{"days": 3, "from": "SFO"}'),
  )
  reference = dict(REFERENCE, actions=["searchFlights", "getWeather", "getWeather"])
  assert tooluse.score(response, reference) == CORRECT
  assert tooluse.score(response, REFERENCE) == WRONG  # getWeather is called twice.


def test_tooluse_counts_matter():
  once = react(("getWeather", '{"city": "New York", "days": 3}'))
  reference = {"actions": ["getWeather", "getWeather"], "inputs": [{"city": "New York", "days": 3}]}
  assert tooluse.score(once, reference) == WRONG
  twice = react(("getWeather", '{"city": "New York"}'), ("getWeather", '{"days": 3}'))
  assert tooluse.score(twice, reference) == CORRECT


@pytest.mark.parametrize(
    "steps",
    [
        [("searchFlights", '{"from": "SFO", "to": "JFK"}')],
        [
            ("searchFlights", '{"from": "SFO", "to": "LAX"}'),
            ("getWeather", '{"city": "New York", "days": 3}'),
        ],
        [
            ("searchFlights", '{"from": "SFO", "to": "JFK"}'),
            ("getWeather", '{"city": "New York", "days": "3"}'),
        ],
        [
            ("searchFlights", '{"from": "SFO", "to": "JFK"}'),
            ("getForecast", '{"city": "New York", "days": 3}'),
        ],
        [
            ("searchFlights", '{"from": "SFO", "to": "JFK", "extra": 1}'),
            ("getWeather", '{"city": "New York", "days": 3}'),
        ],
    ],
)
def test_tooluse_wrong(steps):
  assert tooluse.score(react(*steps), REFERENCE) == WRONG


def test_tooluse_json_values_compared_as_json():
  reference = {"actions": ["f"], "inputs": [{"n": 1, "flag": True, "xs": [1, 2]}]}
  assert tooluse.score(react(("f", '{"n": 1.0, "flag": true, "xs": [1, 2]}')), reference) == CORRECT
  assert tooluse.score(react(("f", '{"n": 1, "flag": 1, "xs": [1, 2]}')), reference) == WRONG
  assert tooluse.score(react(("f", '{"n": 1, "flag": true, "xs": [2, 1]}')), reference) == WRONG


def test_tooluse_fenced_json_and_reference_forms():
  response = 'Action: f\nAction Input: ```json\n{"q": "cats"}\n```'
  assert tooluse.score(response, {"actions": "f", "inputs": '{"q": "cats"}'}) == CORRECT
  assert tooluse.score(response, {"actions": ["f"], "inputs": ['{"q": "cats"}']}) == CORRECT
  assert tooluse.score("Action: g", {"actions": ["g"]}) == CORRECT
  assert tooluse.score("Action: g", {"actions": ["g"], "inputs": None}) == CORRECT


@pytest.mark.parametrize(
    "response, reason",
    [
        ("I will not call any tool.", "No 'Action:' line"),
        ("Action:\nAction Input: {}", "no tool name"),
        ('Action: f\nAction Input: {"q": "cats",}', "Action Input 1 is not valid JSON"),
        ('Action: f\nAction Input: {"q": 1}\nAction: g\nAction Input: {q: 2}', "Action Input 2"),
        ("Action: f\nAction Input: search for cats", "not valid JSON"),
        ('Action: f\nAction Input: ["cats"]', "not a JSON object"),
        ("Action: f\nAction Input: " + "[" * 100_000, "not valid JSON"),
    ],
)
def test_tooluse_format_errors(response, reason):
  result = tooluse.score(response, {"actions": ["f"], "inputs": [{"q": "cats"}]})
  assert result.reward == 0.0 and result.status == "format_error"
  assert reason in result.feedback


def test_tooluse_invalid_reference():
  for reference in (
      {"inputs": [{}]},
      {"actions": []},
      {"actions": ["f"], "inputs": [1]},
      "nope",
      7,
  ):
    result = tooluse.score("Action: f\nAction Input: {}", reference)
    assert result.status == "error" and result.reward == 0.0 and result.feedback


def test_tooluse_score_batch():
  reference = {"actions": ["f"], "inputs": [{"q": 1}]}
  responses = ['Action: f\nAction Input: {"q": 1}', 'Action: f\nAction Input: {"q": 2}']
  assert [r.reward for r in tooluse.score_batch(responses, [reference] * 2)] == [1.0, 0.0]
  with pytest.raises(ValueError):
    tooluse.score_batch(responses, [reference])


# Tool use: native ToolAlpaca gold lists and BFCL allowed values.


def calls(*pairs):
  return "\n".join(f"Action: {name}\nAction Input: {json.dumps(args)}" for name, args in pairs)


def test_tooluse_toolalpaca_gold_list_treats_empty_strings_as_absent():
  gold = [{"Action": "search", "Action_Input": '{"q": "cats", "limit": ""}'},
          {"Action": "open", "Action_Input": {"id": 3}}]
  for reference in (gold, json.dumps(gold)):
    assert tooluse.score(calls(("search", {"q": "cats"}), ("open", {"id": 3})),
                         reference) == CORRECT
  assert tooluse.score(calls(("open", {"id": 3}), ("search", {"q": "cats", "limit": ""})),
                       gold) == CORRECT
  assert tooluse.score(calls(("search", {"q": "cats", "limit": 5}), ("open", {"id": 3})),
                       gold) == WRONG
  assert tooluse.score(calls(("search", {"q": "cats"})), gold) == WRONG
  bad = tooluse.score(calls(("search", {})), [{"Action": "search", "Action_Input": "{q: 1}"}])
  assert bad.status == "error" and "JSON" in bad.feedback


BFCL = {"ground_truth": [{"area": {"base": [10], "unit": ["units", ""], "mode": ["Fast"],
                                   "opts": [{"deep": [True], "tag": ["", "x"]}]}}]}


@pytest.mark.parametrize("args", [
    {"base": 10, "mode": "Fast", "opts": {"deep": True}},
    {"base": 10.0, "unit": "Units", "mode": "fast", "opts": {"deep": True, "tag": "X"}},
    {"base": 10, "unit": "", "mode": "F-a_s.t", "opts": {"deep": True}},
])
def test_tooluse_bfcl_allowed_values_accept(args):
  assert tooluse.score(calls(("area", args)), BFCL) == CORRECT
  assert tooluse.score(calls(("area", args)), BFCL["ground_truth"]) == CORRECT


@pytest.mark.parametrize("name, args", [
    ("area", {"base": 11, "mode": "Fast", "opts": {"deep": True}}),
    ("area", {"mode": "Fast", "opts": {"deep": True}}),
    ("area", {"base": 10, "mode": "Fast", "opts": {"deep": 1}}),
    ("area", {"base": 10, "mode": "Fast", "opts": {"deep": True}, "extra": 1}),
    ("volume", {"base": 10, "mode": "Fast", "opts": {"deep": True}}),
])
def test_tooluse_bfcl_allowed_values_reject(name, args):
  assert tooluse.score(calls((name, args)), BFCL) == WRONG


def test_tooluse_bfcl_pairs_each_action_with_its_input_in_any_call_order():
  gold = {"ground_truth": [{"f": {"x": [1]}}, {"g": {"x": [2]}}, {"optional": {"y": []}}]}
  assert tooluse.score(calls(("g", {"x": 2}), ("optional", {}), ("f", {"x": 1})),
                       gold) == CORRECT
  assert tooluse.score(calls(("f", {"x": 2}), ("g", {"x": 1}), ("optional", {})),
                       gold) == WRONG
  assert tooluse.score(calls(("optional", {"y": 0}), ("g", {"x": 2}), ("f", {"x": 1})),
                       gold) == WRONG
  missing = tooluse.score("Action: f\nAction: g\nAction Input: {\"x\": 2}", gold)
  assert missing.status == "format_error" and "2 'Action:' lines but 1" in missing.feedback
  invalid = tooluse.score(calls(("f", {})), {"ground_truth": [{"f": {"x": 1}}]})
  assert invalid.status == "error" and "allowed values" in invalid.feedback
