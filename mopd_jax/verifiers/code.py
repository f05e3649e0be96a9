"""Unit-test verifier for Python code responses (first version, not a hardened sandbox).

A response is scored by extracting its longest fenced code block and running it against
the reference tests in ONE child Python process (`run_harness`, the single function to
swap for a stronger sandbox). Two reference formats are supported:

- call-based, {"fn_name": name, "inputs": [[arg, ...] or {kwarg: value}, ...],
  "outputs": [value, ...]}: the function is called on every input and its return value,
  converted to plain data by a JSON round trip in the child, is compared with the output
  (ints exactly, floats with a small tolerance);
- stdin/stdout, {"inputs": [text, ...], "outputs": [text, ...]}: the program runs once per
  input with that text on stdin, and its whitespace-normalised stdout is compared.

Trust model: the child receives the inputs but never the expected outputs; it reports raw
results as one JSON document after a random per-call nonce line, and the parent does all
the comparisons. So a program cannot pass by printing "pass" messages, forging a report,
overriding `__eq__`, or exiting early (no report means every test failed). The child runs
in a fresh temporary directory with an empty environment, isolated mode (`-I -S`), its
own process group (killed afterwards), and core, file-size and address-space limits.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from mopd_jax.verifiers.result import Result

_FENCE = re.compile(r"```[ \t]*[\w+#.-]*[ \t]*\n(.*?)```", re.DOTALL)
_MAX_FEEDBACK_CHARS = 2000
_MAX_SHOWN_CHARS = 300
_MAX_SHOWN_FAILURES = 2
_MAX_WALL_CLOCK_S = 30.0
_MAX_RESULT_CHARS = 1 << 20
_MAX_STDOUT_BYTES = 64 << 20
_MAX_MEMORY_BYTES = 2 << 30
_FLOAT_REL_TOL = 1e-6
_FLOAT_ABS_TOL = 1e-9

# Runs in the child. Reads one JSON payload from stdin, runs the tests and writes
# "\n<nonce>\n<json document>\n" to a private duplicate of the original stdout.
_HARNESS = r"""
import builtins, io, json, os, signal, sys


class _Timeout(BaseException):
  pass


def _on_alarm(signum, frame):
  raise _Timeout()


def _describe(exc):
  return f"{type(exc).__name__}: {exc}"[:500]


def _set_limits(max_file_bytes, max_memory_bytes):
  try:
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
    resource.setrlimit(resource.RLIMIT_AS, (max_memory_bytes, max_memory_bytes))
  except (ImportError, ValueError, OSError):
    pass


def _guarded(action, limit_s):
  try:
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
      return {"ok": True, "value": action()}
    finally:
      signal.setitimer(signal.ITIMER_REAL, 0)
  except _Timeout:
    return {"ok": False, "timeout": True, "error": f"time limit exceeded ({limit_s} s)"}
  except BaseException as exc:
    return {"ok": False, "error": _describe(exc)}


def _run_until_timeout(actions, limit_s):
  results = []
  for action in actions:
    if any(result.get("timeout") for result in results):
      results.append({"ok": False, "error": "not run after a timeout"})
    else:
      results.append(_guarded(action, limit_s))
  return results


def _plain(value, max_chars):
  text = json.dumps(value)
  if len(text) > max_chars:
    raise ValueError(f"result too large ({len(text)} characters)")
  return json.loads(text)


def _call_tests(program, fn_name, inputs, limit_s, max_chars):
  sys.stdout = io.StringIO()
  namespace = {"__name__": "solution", "__builtins__": builtins}
  loaded = _guarded(lambda: exec(program, namespace), limit_s)
  if not loaded["ok"]:
    return [loaded] * len(inputs)
  fn = namespace.get(fn_name)
  if not callable(fn):
    return [{"ok": False, "error": f"function {fn_name!r} is not defined"}] * len(inputs)
  calls = [(lambda a=args: _plain(fn(**a), max_chars)) if isinstance(args, dict)
           else (lambda a=args: _plain(fn(*a), max_chars)) for args in inputs]
  return _run_until_timeout(calls, limit_s)


def _run_stdio(program, text, max_chars):
  raw = io.BytesIO()
  sys.stdin = io.TextIOWrapper(io.BytesIO(text.encode("utf-8")), encoding="utf-8")
  sys.stdout = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
  try:
    exec(program, {"__name__": "__main__", "__builtins__": builtins})
  except SystemExit as exc:
    if exc.code not in (None, 0):
      raise
  sys.stdout.flush()
  output = raw.getvalue().decode("utf-8", "replace")
  if len(output) > max_chars:
    raise ValueError(f"output too large ({len(output)} characters)")
  return output


def _stdio_tests(program, inputs, limit_s, max_chars):
  runs = [lambda t=text: _run_stdio(program, t, max_chars) for text in inputs]
  return _run_until_timeout(runs, limit_s)


def _main():
  report = os.fdopen(os.dup(1), "wb")
  payload = json.loads(sys.stdin.buffer.read().decode("utf-8"))
  sys.stdin = io.StringIO("")
  _set_limits(payload["max_file_bytes"], payload["max_memory_bytes"])
  signal.signal(signal.SIGALRM, _on_alarm)
  limit_s, max_chars = payload["time_limit_s"], payload["max_result_chars"]
  try:
    program = compile(payload["code"], "<solution>", "exec")
  except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as exc:
    document = {"syntax_error": _describe(exc)}
  else:
    if payload["fn_name"] is None:
      results = _stdio_tests(program, payload["inputs"], limit_s, max_chars)
    else:
      results = _call_tests(program, payload["fn_name"], payload["inputs"], limit_s,
                            max_chars)
    document = {"results": results}
  report.write(f"\n{payload['nonce']}\n{json.dumps(document)}\n".encode("ascii"))
  report.flush()
  os._exit(0)


_main()
"""


@dataclasses.dataclass(frozen=True)
class HarnessRun:
  """What the child process left behind: its (capped) stdout and stderr tail."""

  stdout: bytes
  stderr: bytes
  returncode: int | None
  timed_out: bool


@dataclasses.dataclass(frozen=True)
class _Reference:
  """Validated tests: `fn_name` is None for stdin/stdout tests."""

  fn_name: str | None
  inputs: list
  outputs: list


def extract_code(response: str) -> str | None:
  """The longest non-empty ``` fenced code block of `response` (any language tag)."""
  blocks = [block for block in _FENCE.findall(response) if block.strip()]
  return max(blocks, key=len) if blocks else None


def _kill_group(pid: int) -> None:
  """Kills the process group led by `pid` (the child and anything it spawned)."""
  try:
    os.killpg(pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _tail(file, num_bytes: int) -> bytes:
  """The last `num_bytes` bytes of a binary file object."""
  size = file.seek(0, os.SEEK_END)
  file.seek(max(0, size - num_bytes))
  return file.read()


def run_harness(payload: bytes, timeout_s: float) -> HarnessRun:
  """Runs the harness on `payload` in a fresh child Python, killed after `timeout_s`."""
  with tempfile.TemporaryDirectory(
      ignore_cleanup_errors=True
  ) as workdir, tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
    child = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", _HARNESS],
        stdin=subprocess.PIPE,
        stdout=stdout,
        stderr=stderr,
        cwd=workdir,
        env={},
        start_new_session=True,
    )
    try:
      child.communicate(payload, timeout=timeout_s)
      timed_out = False
    except subprocess.TimeoutExpired:
      timed_out = True
    finally:
      _kill_group(child.pid)
      child.wait()
    stdout.seek(0)
    return HarnessRun(
        stdout.read(_MAX_STDOUT_BYTES), _tail(stderr, _MAX_SHOWN_CHARS), child.returncode, timed_out
    )


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


def _wall_clock_limit(time_limit_s: float, num_tests: int) -> float:
  """Child wall-clock budget: (per-test limit + 1 s) per test, capped."""
  per_test = time_limit_s + 1.0
  return max(per_test, min(per_test * num_tests, _MAX_WALL_CLOCK_S))


def _parse_document(stdout: bytes, nonce: str, num_tests: int) -> dict | None:
  """The child's report after the last `nonce` line; None if absent or malformed."""
  text = stdout.decode("utf-8", "replace")
  start = text.rfind(f"\n{nonce}\n")
  if start < 0:
    return None
  line = text[start + len(nonce) + 2 :].split("\n", 1)[0]
  try:
    document = json.loads(line)
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
  """Equality of plain JSON data: bools strict, ints exact, floats with a tolerance."""
  if isinstance(got, bool) or isinstance(expected, bool):
    return type(got) is type(expected) and got == expected
  if isinstance(got, (int, float)) and isinstance(expected, (int, float)):
    if isinstance(got, int) and isinstance(expected, int):
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
    error = str(result.get("error", "unknown error"))
    outcome = f"error: {_clip(error, _MAX_SHOWN_CHARS)}"
  return (
      f"Test {index + 1}/{len(reference.inputs)} failed\n"
      f"input: {_show(reference.inputs[index])}\n"
      f"expected: {_show(reference.outputs[index])}\n{outcome}"
  )


def _grade(document: dict, reference: _Reference) -> Result:
  """Result of a well-formed child report."""
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


def _score(response: str, reference: Any, time_limit_s: float) -> Result:
  """`score` without the catch-all."""
  if not isinstance(time_limit_s, (int, float)) or not 0 < time_limit_s <= _MAX_WALL_CLOCK_S:
    raise ValueError(f"time_limit_s must be in (0, {_MAX_WALL_CLOCK_S}], got {time_limit_s!r}")
  tests = _parse_reference(reference)
  code = extract_code(response)
  if code is None:
    return Result(0.0, "No fenced code block found in the response.", 0.0, "format_error")
  nonce = secrets.token_hex(16)
  payload = json.dumps(
      {
          "nonce": nonce,
          "code": code,
          "fn_name": tests.fn_name,
          "inputs": tests.inputs,
          "time_limit_s": float(time_limit_s),
          "max_result_chars": _MAX_RESULT_CHARS,
          "max_file_bytes": _MAX_STDOUT_BYTES,
          "max_memory_bytes": _MAX_MEMORY_BYTES,
      }
  ).encode("utf-8")
  wall_s = _wall_clock_limit(time_limit_s, len(tests.inputs))
  run = run_harness(payload, wall_s)
  if run.timed_out:
    return Result(0.0, f"Time limit exceeded: killed after {wall_s:.1f} s.", 0.0, "timeout")
  document = _parse_document(run.stdout, nonce, len(tests.inputs))
  if document is None:
    stderr = run.stderr.decode("utf-8", "replace").strip()
    feedback = (
        f"The program exited before reporting test results (exit status "
        f"{run.returncode}); all tests failed.\n{stderr}"
    )
    return Result(0.0, _clip(feedback.strip(), _MAX_FEEDBACK_CHARS), 0.0, "ok")
  return _grade(document, tests)


def score(response: str, reference: Any, *, time_limit_s: float = 1.0) -> Result:
  """Runs the longest code block of `response` against `reference` tests.

  Args:
    response: the model response; its longest fenced code block is the program.
    reference: the tests dict (see the module docstring) or its JSON text.
    time_limit_s: wall-clock limit per test, in (0, 30] seconds.

  Returns:
    reward 1.0 iff every test passes, accuracy = fraction passed, feedback on up to two
    failing tests (at most 2000 characters). Never raises: a verifier failure (an invalid
    reference included) gives Result(0.0, status="error") with the reason as feedback.
  """
  try:
    return _score(response, reference, time_limit_s)
  except Exception as exc:  # pylint: disable=broad-except  # Reported, never raised.
    return Result(0.0, _clip(f"Verifier error: {type(exc).__name__}: {exc}", 500), 0.0, "error")


def score_batch(
    responses: Sequence[str],
    references: Sequence,
    *,
    max_workers: int | None = None,
    time_limit_s: float = 1.0,
) -> list[Result]:
  """`score` of each (response, reference) pair on a thread pool, in input order.

  `max_workers` defaults to os.cpu_count(). Raises ValueError when the sequences differ
  in length or `max_workers` is not positive; individual failures become "error" Results.
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
