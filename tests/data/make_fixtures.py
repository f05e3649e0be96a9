"""Writes the small native-format fixtures of this directory (run from the repository root).

  python tests/data/make_fixtures.py

Each fixture mixes good rows with the bad rows the readers must report: malformed lines,
missing fields, undecodable or malicious LiveCodeBench private tests, empty test lists,
non-letter answer keys and tool inputs that are not JSON.
"""

import base64
import json
import os
import pickle
import zlib

import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))


def _write_jsonl(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(row if isinstance(row, str) else json.dumps(row))
      f.write("\n")


def _write_json(path, value):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1)
    f.write("\n")


def _write_parquet(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), path)


def _packed(value) -> str:
  """LiveCodeBench's private-test encoding: base64(zlib(pickle(JSON text)))."""
  return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(value)))).decode("ascii")


def _functional(args_and_outputs):
  return [{"input": "\n".join(json.dumps(a) for a in args), "output": json.dumps(out),
           "testtype": "functional"} for args, out in args_and_outputs]


def _stdin(pairs):
  return [{"input": i, "output": o, "testtype": "stdin"} for i, o in pairs]


def _lcb_row(question_id, title, content, platform, date, public, private, *, func_name=None,
             starter="", difficulty="easy"):
  metadata = json.dumps({"func_name": func_name} if func_name else {})
  return {"question_title": title, "question_content": content, "platform": platform,
          "question_id": question_id, "contest_id": question_id.split("_")[0],
          "contest_date": date, "starter_code": starter, "difficulty": difficulty,
          "public_test_cases": json.dumps(public), "private_test_cases": private,
          "metadata": metadata}


def livecodebench():
  sum_times = _functional([([[1, 2, 3], 2], 12), ([[5], 3], 15), ([[], 7], 0),
                           ([[-1, 1, 4], 1], 4)])
  add = _stdin([("1 2\n", "3\n"), ("10 -4\n", "6\n"), ("0 0\n", "0\n")])
  evil = base64.b64encode(zlib.compress(pickle.dumps((print, "pwned")))).decode("ascii")
  v1 = [
      _lcb_row("2999", "Sum Times K", "Return the sum of nums multiplied by k.", "leetcode",
               "2023-05-20T00:00:00", sum_times[:1], _packed(sum_times[1:]),
               func_name="sumTimes",
               starter="class Solution:\n    def sumTimes(self, nums: List[int], k: int) -> int:\n"
                       "        "),
      _lcb_row("abc300_a", "A + B", "Read two integers A and B and print A + B.", "atcoder",
               "2023-06-03T00:00:00", add[:1], json.dumps(add[1:])),
      "{\"question_id\": \"broken\", \"question_content\": ",  # truncated line
      _lcb_row("abc300_b", "Evil", "Payload names a global.", "atcoder",
               "2023-06-03T00:00:00", add[:1], evil),
      _lcb_row("abc300_c", "Garbage", "Private tests are not decodable.", "atcoder",
               "2023-06-03T00:00:00", add[:1], "!!not base64!!"),
      {k: v for k, v in _lcb_row("abc300_d", "No statement", "x", "atcoder",
                                 "2023-06-03T00:00:00", add, "").items()
       if k != "question_content"},
      _lcb_row("abc300_e", "No tests", "Nothing to run.", "atcoder", "2023-06-03T00:00:00",
               [], ""),
      _lcb_row("3000", "No function name", "Functional tests without func_name.", "leetcode",
               "2023-05-27T00:00:00", sum_times[:1], _packed(sum_times[1:])),
  ]
  reverse = _functional([(["abc"], "cba"), ([""], ""), (["ab"], "ba")])
  v6 = [
      _lcb_row("3500", "Reverse String", "Return s reversed.", "leetcode",
               "2025-03-01T00:00:00", reverse[:1], _packed(reverse[1:]),
               func_name="reverseString", difficulty="medium",
               starter="class Solution:\n    def reverseString(self, s: str) -> str:\n        "),
      _lcb_row("abc400_a", "Bad testtype", "Mixed test types.", "atcoder",
               "2025-04-05T00:00:00", add[:1] + reverse[:1], ""),
  ]
  _write_jsonl(os.path.join(HERE, "livecodebench", "test.jsonl"), v1)
  _write_jsonl(os.path.join(HERE, "livecodebench", "test6.jsonl"), v6)


def deepmath():
  long = "Let us think. " * 200
  rows = [
      {"question": "Compute $\\int_0^1 2x\\,dx$.", "final_answer": "1", "difficulty": 3.0,
       "topic": "Calculus", "r1_solution_1": long, "r1_solution_2": long,
       "r1_solution_3": long},
      {"question": "Find the sum of the roots of $x^2-5x+6=0$.", "final_answer": "5",
       "difficulty": 2.5, "topic": "Algebra", "r1_solution_1": long, "r1_solution_2": long,
       "r1_solution_3": long},
      {"question": "Simplify $\\frac{6}{8}$.", "final_answer": "\\frac{3}{4}",
       "difficulty": 1.0, "topic": "Arithmetic", "r1_solution_1": long,
       "r1_solution_2": long, "r1_solution_3": long},
      {"question": "Which answer is missing?", "final_answer": None, "difficulty": 1.0,
       "topic": "Broken", "r1_solution_1": "", "r1_solution_2": "", "r1_solution_3": ""},
      {"question": "   ", "final_answer": "2", "difficulty": 1.0, "topic": "Broken",
       "r1_solution_1": "", "r1_solution_2": "", "r1_solution_3": ""},
  ]
  _write_parquet(os.path.join(HERE, "deepmath", "train-00000-of-00001.parquet"), rows)


def aime():
  _write_jsonl(os.path.join(HERE, "aime", "aime_2024.jsonl"), [
      {"ID": "2024-I-1", "Problem": "What is $6 \\times 7$?", "Solution": "...",
       "Answer": 42},
      {"ID": "2024-I-2", "Problem": "What is $2^{10}$?", "Solution": "...", "Answer": 1024},
      {"ID": "2024-I-3", "Problem": "A problem without an answer.", "Solution": "..."},
      "not json at all",
  ])
  _write_jsonl(os.path.join(HERE, "aime", "hmmt_feb_2025.jsonl"), [
      {"problem_idx": 1, "problem": "Compute $\\sqrt{8}$ in simplest form.",
       "answer": "2\\sqrt{2}"},
      {"problem_idx": 2, "problem": "", "answer": "3"},
  ])


def _sci(question, texts, labels, key, level, **extra):
  return {"question": question, "choices": {"text": texts, "label": labels},
          "answerKey": key, "type": f"mcq-{len(texts)}-choices", "domain": "Chemistry",
          "details": {"level": level, "task": "reaction", "subtask": "prediction"}, **extra}


def sciknoweval():
  rows = [
      _sci("Which gas is produced when zinc reacts with hydrochloric acid?",
           ["Oxygen", "Hydrogen", "Chlorine", "Nitrogen"], ["A", "B", "C", "D"], "B", "L3"),
      _sci("Is the reaction of sodium with water exothermic?", ["Yes", "No"], ["A", "B"],
           "A", "L3"),
      _sci("What is the pH of pure water at 25 C?", ["7", "1", "14", "0"],
           ["A", "B", "C", "D"], "A", "L3"),
      *[_sci(f"How many moles of {gas} are in {n * 22.4:g} L of it at STP?",
             [str(n), str(n + 1), str(2 * n), str(n + 3)], ["A", "B", "C", "D"], "A", "L3")
        for n, gas in enumerate(("helium", "neon", "argon", "oxygen", "nitrogen",
                                 "methane", "ethane", "propane", "chlorine"), start=1)],
      _sci("Which element has atomic number 6?", ["Carbon", "Boron", "Neon", "Helium"],
           ["A", "B", "C", "D"], "A", "L1"),
      _sci("Three options are not kept.", ["x", "y", "z"], ["A", "B", "C"], "C", "L3"),
      _sci("Numeric answer key.", ["x", "y"], ["A", "B"], "1", "L3"),
      _sci("Answer key not among the labels.", ["x", "y"], ["A", "B"], "D", "L3"),
      {"question": "No choices at all.", "answerKey": "A", "details": {"level": "L3"}},
      "{\"question\": ",
  ]
  _write_jsonl(os.path.join(HERE, "sciknoweval", "chemistry.jsonl"), rows)


def _tool(name, functions, documentation, **extra):
  return {"Name": name, "Link": f"https://example.org/{name.lower()}", "Category": "Tools",
          "Description": f"The {name} API.", "Documentation": "{\"openapi\": \"3.0.0\"}",
          "NLDocumentation": documentation, "Function_Description": functions,
          "Function_Projection": {f: ["GET", f"/{f}"] for f in functions}, **extra}


def toolalpaca():
  weather = _tool(
      "WeatherNow", {"getCurrentWeather": "city (string), units (string, optional)",
                     "getForecast": "city (string), days (integer)"},
      "getCurrentWeather: Current weather of a city. Parameters: {\"city\": \"Required. "
      "string.\", \"units\": \"Optional. string. metric or imperial.\"}\n"
      "getForecast: Forecast of a city. Parameters: {\"city\": \"Required. string.\", "
      "\"days\": \"Required. integer.\"}",
      Instructions=["What's the weather in Paris right now?",
                    "Give me a 3-day forecast for Oslo and the current weather there.",
                    "Weather in Rome, please."],
      Golden_Answers=[
          [{"Action": "getCurrentWeather",
            "Action_Input": "{\"city\": \"Paris\", \"units\": \"\"}"}],
          [{"Action": "getForecast", "Action_Input": "{\"city\": \"Oslo\", \"days\": 3}"},
           {"Action": "getCurrentWeather", "Action_Input": "{\"city\": \"Oslo\"}"}],
          [{"Action": "getCurrentWeather", "Action_Input": "{city: Rome}"}],
      ])
  books = _tool(
      "OpenBooks", {"searchBooks": "q (string), limit (integer, optional)"},
      "searchBooks: Search books. Parameters: {\"q\": \"Required. string.\", \"limit\": "
      "\"Optional. integer.\"}",
      Instructions=["Find books about volcanoes."],
      Golden_Answers=[[{"Action": "searchBooks",
                        "Action_Input": "{\"q\": \"volcanoes\", \"limit\": \"\"}"}]])
  broken = _tool("Broken", {"f": "nothing"}, "f: nothing", Instructions=["a", "b"],
                 Golden_Answers=[[]])
  _write_json(os.path.join(HERE, "toolalpaca", "eval_simulated.json"),
              [weather, books, broken])
  trained = _tool(
      "CatFacts", {"getRandomFact": "animal_type (string)"},
      "getRandomFact: A random fact. Parameters: {\"animal_type\": \"Required. string.\"}",
      Instructions=["Tell me a cat fact."],
      Instances=[
          {"input": "Tell me a cat fact.", "output": "Cats sleep a lot.",
           "Final Thought": "done",
           "intermediate_steps": [[["getRandomFact", "{\"animal_type\": \"cat\"}",
                                    "I should call getRandomFact."], "Status 200"]]},
          *[{"input": f"Tell me something about {animal}s.", "output": "A fact.",
             "Final Thought": "done",
             "intermediate_steps": [[["getRandomFact", json.dumps({"animal_type": animal}),
                                      "I should call getRandomFact."], "Status 200"]]}
            for animal in ("bird", "horse", "fish")],
          {"input": "And a dog fact?", "output": "", "Final Thought": "",
           "intermediate_steps": [[["getRandomFact", "animal_type=dog", "log"], "error"]]},
      ])
  _write_json(os.path.join(HERE, "toolalpaca", "train_data.json"), [trained])


def mopd_parquet():
  tests = {"fn_name": "double", "inputs": [[1], [4]], "outputs": [2, 8]}
  rows = [
      {"prompt": "Write a Python function double(x) returning 2*x, in a ```python block.",
       "answer": None, "tests": json.dumps(tests), "kind": "code", "dataset": "toy_code",
       "idx": 0, "description": "code", "system": None},
      {"prompt": "What is 3+4? Put the answer in \\boxed{}.", "answer": "7", "tests": None,
       "kind": "math", "dataset": "toy_math", "idx": 0, "description": "math",
       "system": None},
      {"prompt": "Pick the noble gas: A. Neon B. Iron. Answer in <answer></answer>.",
       "answer": "A", "tests": None, "kind": "mcq", "dataset": "toy_science", "idx": 0,
       "description": "chemistry", "system": "You are a chemist."},
      {"prompt": "Call the tool.", "answer": json.dumps([{"Action": "ping",
                                                          "Action_Input": "{}"}]),
       "tests": None, "kind": "tooluse", "dataset": "toy_tools", "idx": 0,
       "description": "tools", "system": None},
      {"prompt": "Unknown kind.", "answer": "1", "tests": None, "kind": "poetry",
       "dataset": "toy_bad", "idx": 0, "description": "", "system": None},
      {"prompt": "Tests are not JSON.", "answer": None, "tests": "{inputs: []",
       "kind": "code", "dataset": "toy_bad", "idx": 1, "description": "", "system": None},
  ]
  _write_parquet(os.path.join(HERE, "mopd_parquet", "processed.parquet"), rows)


if __name__ == "__main__":
  livecodebench()
  deepmath()
  aime()
  sciknoweval()
  toolalpaca()
  mopd_parquet()
