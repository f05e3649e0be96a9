r"""The user message of each domain: the problem text plus the answer-format instruction.

MOPD spec section 7: code asks for a solution in a fenced code block within the time
limit, math for the final answer within \boxed{}; multiple choice asks for the letter
inside <answer></answer> and tool use for `Action:` / `Action Input:` lines, which is what
`verifiers.choice` and `verifiers.tooluse` read.
"""

from __future__ import annotations

import json


def code(statement: str, *, starter_code: str = "", fn_name: str | None = None,
         time_limit_s: float = 1.0) -> str:
  """A coding problem: stdin/stdout without `fn_name`, a function or method with it."""
  parts = [statement.strip()]
  if starter_code.strip():
    parts.append(f"Use this starter code:\n```python\n{starter_code.strip()}\n```")
  if fn_name is None:
    parts.append("Read the input from standard input and write the answer to standard "
                 "output.")
  else:
    parts.append(f"Implement `{fn_name}` (a function, or a method of `class Solution`); it "
                 "is called on each test's arguments and its return value is checked.")
  seconds = f"{time_limit_s:g} second" + ("" if time_limit_s == 1 else "s")
  parts.append(f"Give the complete Python solution in one fenced code block "
               f"(```python ... ```). Each test must finish within {seconds}.")
  return "\n\n".join(parts)


def math(question: str) -> str:
  return (f"{question.strip()}\n\nPlease reason step by step, and put your final answer "
          "within \\boxed{}.")


def choice(question: str, options: list[tuple[str, str]]) -> str:
  """A multiple-choice question; `options` are (letter, text) pairs."""
  lines = "\n".join(f"{letter}. {text}" for letter, text in options)
  return (f"{question.strip()}\n\n{lines}\n\nAnswer with the letter of the correct option "
          "inside <answer></answer>, e.g. <answer>A</answer>.")


def tooluse(request: str, tools: str) -> str:
  """A tool-use request; `tools` describes the available tools (free text)."""
  return (f"You can call these tools:\n\n{tools.strip()}\n\nUser request: {request.strip()}"
          "\n\nCall the tools needed to fulfil the request. Write each call as two lines:\n"
          "Action: <tool name>\nAction Input: <the arguments as one JSON object>")


def json_schema_lines(functions: list[dict]) -> str:
  """One JSON line per function description (name, description, parameters)."""
  return "\n".join(json.dumps(f, ensure_ascii=False, sort_keys=True) for f in functions)
