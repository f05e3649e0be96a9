"""Unit-test verifier for Python code responses, run in the process sandbox.

A response is scored by extracting its longest fenced code block and running it against
the reference tests in `sandbox.SandboxPool` (see sandbox.py for the isolation). Two
reference formats are supported:

- call-based, {"fn_name": name, "inputs": [[arg, ...] or {kwarg: value}, ...],
  "outputs": [value, ...]}: the function (a module-level function, or a method of a
  LeetCode-style `class Solution`, called on a fresh instance) is called on every input;
  its return value, turned into plain data by a JSON round trip, is compared in the parent
  with the output (int outputs exactly, float outputs with a small tolerance, bools
  strictly). As on LeetCode, the program starts with the public names of `typing` (`List`,
  `Optional`, ...) and the modules bisect, collections, functools, heapq, itertools, math,
  operator, random, re, statistics and string already defined;
- stdin/stdout, {"inputs": [text, ...], "outputs": [text, ...]}: the program runs once per
  input with that text on stdin (fd 0: `input()`, `sys.stdin` and `open(0)` all work),
  and its whitespace-normalised stdout is compared.

Every test runs in its own fresh process, forked inside the sandbox from a harness that
never executes the program itself: the program is loaded and run there with a wall-clock
limit of `time_limit_s + 1` s (the process group is then killed) and the address-space
limit of the sandbox (1 GiB). After a test times out, the remaining tests are not run.
The harness is the source text of `verifiers.code_harness`.

Trust model: the sandbox receives the program and the inputs, never the expected
outputs; the harness reports raw results (return values, stdout) as one JSON document
and the parent does all the comparisons. So a program cannot pass by printing "pass"
messages, forging or tampering with the report, overriding `__eq__`, or exiting early
(a test whose process reports nothing, or exits with an error, fails).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import json
import math
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from mopd_jax.verifiers import sandbox
from mopd_jax.verifiers.code_harness import HARNESS
from mopd_jax.verifiers.result import Result

_FENCE = re.compile(r"```[ \t]*[\w+#.-]*[ \t]*\n(.*?)```", re.DOTALL)
_MAX_FEEDBACK_CHARS = 2000
_MAX_SHOWN_CHARS = 300
_MAX_SHOWN_FAILURES = 2
_MAX_WALL_CLOCK_S = 30.0
_HARNESS_SLACK_S = 1.0
_MAX_OUTPUT_BYTES = 1 << 20
_FLOAT_REL_TOL = 1e-6
_FLOAT_ABS_TOL = 1e-9

_pool: sandbox.SandboxPool | None = None
_pool_lock = threading.Lock()


class _Reference(NamedTuple):
  """Validated tests: `fn_name` is None for stdin/stdout tests."""

  fn_name: str | None
  inputs: list
  outputs: list


def default_pool(min_workers: int | None = None) -> sandbox.SandboxPool:
  """The process-wide sandbox pool of the verifier, started on first use.

  It has os.cpu_count() workers, grown to `min_workers` if that is larger, and is closed
  at interpreter exit.
  """
  global _pool
  with _pool_lock:
    wanted = max(min_workers or 1, os.cpu_count() or 1)
    if _pool is None:
      _pool = sandbox.SandboxPool(HARNESS, num_workers=wanted)
      atexit.register(_pool.close)
    else:
      _pool.ensure_workers(wanted)
    return _pool


def isolation_report() -> dict:
  """Which isolation mechanisms the verifier's sandbox has active (see sandbox.py)."""
  return default_pool().isolation


def extract_code(response: str) -> str | None:
  """The longest non-empty ``` fenced code block of `response` (any language tag)."""
  blocks = [block for block in _FENCE.findall(response) if block.strip()]
  return max(blocks, key=len) if blocks else None


def _parse_reference(reference: Any) -> _Reference:
  """Validates a tests dict (or its JSON text) and converts it to plain JSON data."""
  if isinstance(reference, (str, bytes)):
    reference = json.loads(reference)
  if not isinstance(reference, Mapping):
    raise ValueError(f"reference must be a dict or a JSON object, got {reference!r:.100}")
  inputs, outputs = json.loads(json.dumps([reference.get("inputs"), reference.get("outputs")]))
  if not isinstance(inputs, list) or not isinstance(outputs, list) or not inputs:
    raise ValueError(f"reference needs non-empty 'inputs' and 'outputs' lists, got {inputs!r:.100}")
  if len(inputs) != len(outputs):
    raise ValueError(f"reference has {len(inputs)} inputs but {len(outputs)} outputs")
  fn_name = reference.get("fn_name") or None
  if fn_name is None:
    if not all(isinstance(text, str) for text in inputs + outputs):
      raise ValueError("stdin/stdout reference needs string inputs and outputs")
  elif not isinstance(fn_name, str) or not fn_name.isidentifier():
    raise ValueError(f"reference fn_name {fn_name!r} is not a Python identifier")
  elif not all(isinstance(args, (list, dict)) for args in inputs):
    raise ValueError("call-based reference needs argument lists or kwargs dicts")
  return _Reference(fn_name, inputs, outputs)


def _run_budget(time_limit_s: float, num_tests: int) -> float:
  """Wall-clock budget of one response: (limit + 1 s) per test, capped, plus slack."""
  return min((time_limit_s + 1.0) * num_tests, _MAX_WALL_CLOCK_S) + _HARNESS_SLACK_S


def _parse_document(report: bytes, num_tests: int) -> dict | None:
  """The harness report; None if absent or malformed."""
  try:
    document = json.loads(report.decode("utf-8"))
  except (ValueError, RecursionError):
    return None
  if not isinstance(document, dict):
    return None
  if isinstance(document.get("syntax_error"), str):
    return document
  results = document.get("results")
  if not isinstance(results, list) or len(results) != num_tests:
    return None
  return document if all(isinstance(result, dict) for result in results) else None


def _close(got: float, expected: float) -> bool:
  """Float comparison with a small relative and absolute tolerance."""
  try:
    return math.isclose(got, expected, rel_tol=_FLOAT_REL_TOL, abs_tol=_FLOAT_ABS_TOL)
  except OverflowError:
    return False


def _same(got: Any, expected: Any) -> bool:
  """Equality of plain JSON data: bools strict, int expectations exact, floats with a tolerance.

  An int expectation needs a number exactly equal to it (3 or 3.0 for 3, but no float
  approximation of a large integer); a float expectation accepts any close number.
  """
  if isinstance(got, bool) or isinstance(expected, bool):
    return type(got) is type(expected) and got == expected
  if isinstance(got, (int, float)) and isinstance(expected, (int, float)):
    if isinstance(expected, int):
      return got == expected
    return _close(got, expected)
  if isinstance(got, list) and isinstance(expected, list):
    return len(got) == len(expected) and all(map(_same, got, expected))
  if isinstance(got, dict) and isinstance(expected, dict):
    return got.keys() == expected.keys() and all(_same(got[k], expected[k]) for k in got)
  return type(got) is type(expected) and got == expected


def _normalise_text(text: str) -> str:
  """Stdout without leading/trailing blank space and with runs of spaces collapsed."""
  return "\n".join(" ".join(line.split()) for line in text.strip().splitlines())


def _passed(result: dict, expected: Any, call_based: bool) -> bool:
  """Whether one reported test result matches the expected output."""
  if result.get("ok") is not True or "value" not in result:
    return False
  got = result["value"]
  if call_based:
    return _same(got, expected)
  return isinstance(got, str) and _normalise_text(got) == _normalise_text(expected)


def _clip(text: str, max_chars: int) -> str:
  """`text`, cut to at most `max_chars` characters with a trailing ellipsis."""
  return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def _show(value: Any) -> str:
  """Short JSON rendering of plain data for feedback."""
  return _clip(json.dumps(value, ensure_ascii=False), _MAX_SHOWN_CHARS)


def _failure(index: int, reference: _Reference, result: dict) -> str:
  """Feedback lines for one failing test."""
  if result.get("ok") is True and "value" in result:
    outcome = f"got: {_show(result['value'])}"
  else:
    outcome = f"error: {_clip(str(result.get('error', 'unknown error')), _MAX_SHOWN_CHARS)}"
  return (
      f"Test {index + 1}/{len(reference.inputs)} failed\n"
      f"input: {_show(reference.inputs[index])}\n"
      f"expected: {_show(reference.outputs[index])}\n{outcome}"
  )


def _grade(document: dict, reference: _Reference) -> Result:
  """Result of a well-formed harness report."""
  if "syntax_error" in document:
    return Result(0.0, _clip(document["syntax_error"], _MAX_FEEDBACK_CHARS), 0.0, "format_error")
  results = document["results"]
  call_based = reference.fn_name is not None
  passed = [_passed(r, e, call_based) for r, e in zip(results, reference.outputs)]
  failing = [i for i, ok in enumerate(passed) if not ok]
  lines = [_failure(i, reference, results[i]) for i in failing[:_MAX_SHOWN_FAILURES]]
  if failing:
    lines.append(f"{len(failing)} of {len(passed)} tests failed.")
  timed_out = any(result.get("timeout") is True for result in results)
  return Result(
      reward=0.0 if failing else 1.0,
      feedback=_clip("\n\n".join(lines), _MAX_FEEDBACK_CHARS),
      accuracy=sum(passed) / len(passed),
      status="timeout" if timed_out else "ok",
  )


def grade_outputs(outputs: Sequence[Any], reference: Any) -> Result:
  """The Result of a call-based program that returned `outputs` (plain data, one per test)
  on the tests of `reference`: what `score` gives such a program, feedback text included,
  without running anything (e.g. to show a known program's feedback)."""
  tests = _parse_reference(reference)
  if tests.fn_name is None or len(outputs) != len(tests.inputs):
    raise ValueError("grade_outputs needs a call-based reference and one output per test.")
  document = {"results": [{"ok": True, "value": json.loads(json.dumps(v))} for v in outputs]}
  return _grade(document, tests)


def _score(
    response: str,
    reference: Any,
    time_limit_s: float,
    deadline: float | None,
    pool: sandbox.SandboxPool,
) -> Result:
  """`score` without the catch-all; `deadline` is a time.monotonic() value or None."""
  if not isinstance(time_limit_s, (int, float)) or not 0 < time_limit_s <= _MAX_WALL_CLOCK_S:
    raise ValueError(f"time_limit_s must be in (0, {_MAX_WALL_CLOCK_S}], got {time_limit_s!r}")
  tests = _parse_reference(reference)
  code = extract_code(response)
  if code is None:
    return Result(0.0, "No fenced code block found in the response.", 0.0, "format_error")
  payload = json.dumps(
      {
          "code": code,
          "fn_name": tests.fn_name,
          "inputs": tests.inputs,
          "limit_s": float(time_limit_s) + 1.0,
          "max_bytes": _MAX_OUTPUT_BYTES,
      }
  ).encode("utf-8")
  try:
    run = pool.run(payload, _run_budget(time_limit_s, len(tests.inputs)), deadline=deadline)
  except TimeoutError:
    return Result(0.0, "Not verified: the batch deadline passed first.", 0.0, "timeout")
  if run.timed_out:
    if run.stopped_by == "memory_budget":
      return Result(0.0, run.reason, 0.0, "timeout")
    return Result(0.0, f"Time limit exceeded: killed after {run.wall_s:.1f} s.", 0.0, "timeout")
  document = _parse_document(run.report, len(tests.inputs))
  if document is None:
    feedback = (
        f"The program ended the test harness before it reported results (exit "
        f"status {run.exit_code}); all tests failed."
    )
    return Result(0.0, feedback, 0.0, "ok")
  return _grade(document, tests)


def _verifier_error(exc: Exception) -> Result:
  return Result(0.0, _clip(f"Verifier error: {type(exc).__name__}: {exc}", 500), 0.0, "error")


def score(response: str, reference: Any, *, time_limit_s: float = 1.0) -> Result:
  """Runs the longest code block of `response` against `reference` tests.

  Args:
    response: the model response; its longest fenced code block is the program.
    reference: the tests dict (see the module docstring) or its JSON text.
    time_limit_s: the problem's time limit, in (0, 30] seconds; each test may take this
      plus 1 s of wall-clock time.

  Returns:
    reward 1.0 iff every test passes, accuracy = fraction passed, feedback on up to two
    failing tests (at most 2000 characters). Never raises: a verifier failure (an invalid
    reference included) gives Result(0.0, status="error") with the reason as feedback.
  """
  try:
    return _score(response, reference, time_limit_s, None, default_pool())
  except Exception as exc:  # pylint: disable=broad-except  # Reported, never raised.
    return _verifier_error(exc)


def score_batch_with_stats(
    responses: Sequence[str],
    references: Sequence,
    *,
    max_workers: int | None = None,
    time_limit_s: float = 1.0,
    deadline_s: float | None = None,
) -> tuple[list[Result], dict[str, float]]:
  """`score_batch` and its statistics.

  Returns:
    (results in input order, stats) with stats
      verify/timeouts: responses with status "timeout" (including those the deadline cut);
      verify/errors: responses the verifier failed on (status "error", e.g. a sandbox crash);
      verify/format_errors: responses without a code block or with a syntax error;
      verify/mean_time_s: mean wall-clock seconds spent on one response.
  """
  if len(responses) != len(references):
    raise ValueError(f"Got {len(responses)} responses but {len(references)} references.")
  if max_workers is not None and max_workers < 1:
    raise ValueError(f"max_workers must be positive, got {max_workers}.")
  if deadline_s is not None and not deadline_s > 0:
    raise ValueError(f"deadline_s must be positive or None, got {deadline_s!r}.")
  results, times = [], []
  if responses:
    workers = min(max_workers or os.cpu_count() or 1, len(responses))
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    try:
      pool = default_pool(workers)
    except Exception as exc:  # pylint: disable=broad-except  # Reported, never raised.
      pool, results = None, [_verifier_error(exc)] * len(responses)

    def verify(response, reference):
      start = time.monotonic()
      try:
        result = _score(response, reference, time_limit_s, deadline, pool)
      except Exception as exc:  # pylint: disable=broad-except  # Reported, never raised.
        result = _verifier_error(exc)
      return result, time.monotonic() - start

    if pool is not None:
      with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as executor:
        for result, seconds in executor.map(verify, responses, references):
          results.append(result)
          times.append(seconds)
  statuses = [result.status for result in results]
  return results, {
      "verify/timeouts": float(statuses.count("timeout")),
      "verify/errors": float(statuses.count("error")),
      "verify/format_errors": float(statuses.count("format_error")),
      "verify/mean_time_s": sum(times) / len(times) if times else 0.0,
  }


def score_batch(
    responses: Sequence[str],
    references: Sequence,
    *,
    max_workers: int | None = None,
    time_limit_s: float = 1.0,
    deadline_s: float | None = None,
) -> list[Result]:
  """`score` of each (response, reference) pair, `max_workers` at a time, in input order.

  Args:
    responses: model responses.
    references: their tests (see the module docstring).
    max_workers: concurrent sandboxed runs; defaults to os.cpu_count() (the sandbox pool
      grows to this size).
    time_limit_s: the problems' time limit (see `score`).
    deadline_s: if set, a global deadline for the batch in seconds: responses still
      unverified when it passes score 0 with status "timeout".

  Raises ValueError when the sequences differ in length, `max_workers` is not positive or
  `deadline_s` is not positive; individual failures become "error" Results.
  """
  return score_batch_with_stats(
      responses,
      references,
      max_workers=max_workers,
      time_limit_s=time_limit_s,
      deadline_s=deadline_s,
  )[0]
