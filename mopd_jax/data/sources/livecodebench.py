"""LiveCodeBench `code_generation_lite`: `test.jsonl` ... `test6.jsonl`.

Every field of a row is a string. `public_test_cases` is JSON text of
[{"input", "output", "testtype": "functional" | "stdin"}]; `private_test_cases` is the same
list as JSON text, or (most rows) base64 of zlib of a pickle of that JSON text. The pickle is
decoded by an unpickler that refuses every global, so a payload naming a class or function
is a bad row and nothing in it runs. For functional (LeetCode-style) tests the function name
is `func_name` in `metadata` (JSON text) and each line of `input` is one JSON-encoded
argument; `output` is JSON.

Reference: {"fn_name": name, "inputs": [[arg, ...], ...], "outputs": [value, ...]} or, for
stdin tests, {"inputs": [text, ...], "outputs": [text, ...]} (`verifiers.code`).

Options:
  release: "release_v1" ... "release_v6" (cumulative: test.jsonl up to test<N>.jsonl) or
    "v1" ... "v6" (that release's file only); only for a directory. Default: every file.
  start_date, end_date: keep problems whose `contest_date` (ISO) is within [start, end];
    the others are filtered.
  split: None (all tests), "train" or "test": the SDPO-style split, the same problems with
    half of each problem's tests (ceil(n/2) for "train", the rest for "test"), chosen by a
    generator seeded with (split_seed, problem id). A problem with a single test has no
    "test" half and is filtered from that split.
  split_seed: 0.
  time_limit_s: the time limit stated in the prompt (1.0; the verifier's own limit is set
    in its config).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import pickle
import re
import zlib

import numpy as np

from mopd_jax.data.sources import common, instructions

_RELEASES = {f"release_v{n}": tuple(range(1, n + 1)) for n in range(1, 7)}
_RELEASES.update({f"v{n}": (n,) for n in range(1, 7)})
_FILE_NUMBER = re.compile(r"test(\d*)\.jsonl$")


class _NoGlobalsUnpickler(pickle.Unpickler):
  """Unpickles plain data only: any reference to a global is refused."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(f"refused global {module}.{name}")


def decode_private_tests(text: str) -> list:
  """The private tests of a row: plain JSON, else base64 -> zlib -> pickle -> JSON text.

  Raises common.BadRow with the step that failed.
  """
  try:
    return json.loads(text)
  except ValueError:
    pass
  try:
    packed = zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
  except (ValueError, UnicodeEncodeError, binascii.Error, zlib.error) as exc:
    raise common.BadRow("private_test_cases", f"neither JSON nor base64+zlib: {exc}") from exc
  try:
    value = _NoGlobalsUnpickler(io.BytesIO(packed)).load()
  except Exception as exc:  # pylint: disable=broad-except  # Any unpickling failure.
    raise common.BadRow("private_test_cases",
                        f"unpickling failed: {type(exc).__name__}: {exc}") from exc
  if isinstance(value, bytes):
    value = value.decode("utf-8", "replace")
  if not isinstance(value, str):
    raise common.BadRow("private_test_cases",
                        f"pickle holds {type(value).__name__}, not JSON text")
  try:
    return json.loads(value)
  except ValueError as exc:
    raise common.BadRow("private_test_cases", f"pickled text is not JSON: {exc}") from exc


def _test_list(value, name: str) -> list[dict]:
  if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
    raise common.BadRow(name, "expected a list of test objects")
  for test in value:
    for key in ("input", "output", "testtype"):
      if not isinstance(test.get(key), str):
        raise common.BadRow(name, f"a test has no string {key!r}")
  return value


def _functional_case(test: dict, name: str) -> tuple[list, object]:
  try:
    args = [json.loads(line) for line in test["input"].split("\n") if line.strip()]
    return args, json.loads(test["output"])
  except ValueError as exc:
    raise common.BadRow(name, f"functional test is not JSON per line: {exc}") from exc


def _split_tests(tests: list, split: str | None, seed: int, problem_id: str) -> list | None:
  """The tests of `split` (see the module docstring); None when the split is empty."""
  if split is None:
    return tests
  order = np.random.default_rng([seed, zlib.crc32(problem_id.encode("utf-8"))]).permutation(
      len(tests))
  half = math.ceil(len(tests) / 2)
  chosen = sorted(order[:half] if split == "train" else order[half:])
  return [tests[i] for i in chosen] or None


def _problem(row, release_file: str, options: dict) -> common.Problem | None:
  problem_id = common.field(row, "question_id")
  statement = common.field(row, "question_content")
  date = common.field(row, "contest_date", optional=True) or ""
  if options["start_date"] and date[:10] < options["start_date"]:
    return None
  if options["end_date"] and date[:10] > options["end_date"]:
    return None
  try:
    public = json.loads(common.field(row, "public_test_cases"))
  except ValueError as exc:
    raise common.BadRow("public_test_cases", f"not JSON: {exc}") from exc
  private_text = common.field(row, "private_test_cases", optional=True)
  private = decode_private_tests(private_text) if private_text else []
  tests = _test_list(public, "public_test_cases") + _test_list(private, "private_test_cases")
  if not tests:
    raise common.BadRow("private_test_cases", "no tests")
  types = {t["testtype"] for t in tests}
  if len(types) != 1 or not types <= {"functional", "stdin"}:
    raise common.BadRow("testtype", f"expected all 'functional' or all 'stdin', got "
                        f"{sorted(types)}")
  tests = _split_tests(tests, options["split"], options["split_seed"], problem_id)
  if tests is None:
    return None
  starter = common.field(row, "starter_code", optional=True) or ""
  if types == {"functional"}:
    try:
      metadata = json.loads(common.field(row, "metadata"))
    except ValueError as exc:
      raise common.BadRow("metadata", f"not JSON: {exc}") from exc
    fn_name = metadata.get("func_name") if isinstance(metadata, dict) else None
    if not isinstance(fn_name, str) or not fn_name.isidentifier():
      raise common.BadRow("metadata", f"func_name {fn_name!r} is not a Python identifier")
    cases = [_functional_case(t, "public_test_cases") for t in tests]
    reference = {"fn_name": fn_name, "inputs": [a for a, _ in cases],
                 "outputs": [o for _, o in cases]}
  else:
    fn_name = None
    reference = {"inputs": [t["input"] for t in tests], "outputs": [t["output"] for t in tests]}
  prompt = instructions.code(statement, starter_code=starter, fn_name=fn_name,
                             time_limit_s=options["time_limit_s"])
  meta = {key: row.get(key) for key in ("question_title", "platform", "difficulty",
                                        "contest_id", "contest_date")}
  meta["release_file"] = release_file
  return common.Problem(problem_id, "code", prompt, reference, meta)


def _select_release(paths: list[str], release: str | None, directory: bool) -> list[str]:
  if release is None:
    return paths
  if release not in _RELEASES:
    raise ValueError(f"Unknown LiveCodeBench release {release!r}; allowed: "
                     f"{sorted(_RELEASES)}.")
  if not directory:
    raise ValueError(f"release={release!r} selects files of a directory; got a single file "
                     f"{paths[0]!r}.")
  numbers = _RELEASES[release]
  chosen = []
  for path in paths:
    match = _FILE_NUMBER.search(path)
    if match and int(match.group(1) or 1) in numbers:
      chosen.append(path)
  if not chosen:
    raise FileNotFoundError(f"No file of LiveCodeBench {release} among {paths}.")
  return chosen


def load(path: str, rows: common.Rows, *, release: str | None = None,
         start_date: str | None = None, end_date: str | None = None,
         split: str | None = None, split_seed: int = 0,
         time_limit_s: float = 1.0) -> list[str]:
  """Reads the LiveCodeBench file or directory `path` into `rows`; returns the files read."""
  if split not in (None, "train", "test"):
    raise ValueError(f"split must be None, 'train' or 'test', got {split!r}.")
  paths = _select_release(common.files(path, ("test*.jsonl",), "LiveCodeBench"), release,
                          os.path.isdir(path))
  options = {"start_date": start_date, "end_date": end_date, "split": split,
             "split_seed": split_seed, "time_limit_s": time_limit_s}
  for file in paths:
    name = os.path.basename(file)
    for where, row in common.jsonl_rows(file, rows, paths):
      rows.add(where, _problem, row, name, options)
  return paths
