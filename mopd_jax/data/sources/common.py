"""What every source reader shares: `Problem`, bad-row bookkeeping and file reading.

A reader turns rows of one dataset format into `Problem`s. A row that cannot become a
problem raises `BadRow(field, reason)`; `Rows.add` catches it, logs it with its location
and counts it, and the load goes on. Rows that the reader's options exclude (a level, a
date window, a split) are counted as filtered, not as bad.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

DOMAINS = ("code", "math", "choice", "tooluse")


@dataclasses.dataclass(frozen=True)
class Problem:
  """One problem, ready to be rendered as a prompt and verified.

  Attributes:
    id: a stable identifier taken from the source (or the file and row it came from).
    domain: "code", "math", "choice" or "tooluse": the verifier module that scores it.
    prompt: the user message, with the domain's answer-format instruction.
    reference: exactly what `mopd_jax.verifiers.<domain>.score(response, reference)` takes;
      plain JSON data.
    meta: source facts that are not needed to verify (difficulty, date, level, ...).
  """

  id: str
  domain: str
  prompt: str
  reference: Any
  meta: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.domain not in DOMAINS:
      raise ValueError(f"Unknown domain {self.domain!r}; allowed: {DOMAINS}.")


class BadRow(ValueError):
  """A row that cannot become a problem: `field` is the offending field."""

  def __init__(self, field: str, reason: str):
    super().__init__(f"{field}: {reason}")
    self.field, self.reason = field, reason


class Rows:
  """Collects the problems and bad rows of one load; `finish` writes the report.

  report["rows"]: rows read; report["problems"]: problems returned; report["bad_rows"]:
  rows that could not become a problem, each listed in report["bad"] as
  (location, field, reason); report["filtered"]: rows that the options exclude.
  """

  def __init__(self, kind: str):
    self.kind = kind
    self.problems: list[Problem] = []
    self.bad: list[tuple[Any, str, str]] = []
    self.filtered = 0
    self.read = 0
    self._ids: set[str] = set()

  def add(self, location, make: Callable[..., Problem | None], *args) -> None:
    """Adds the problem `make(*args)` returns (None: filtered); a BadRow is recorded instead."""
    self.read += 1
    try:
      problem = make(*args)
      if problem is not None and problem.id in self._ids:
        raise BadRow("id", f"duplicate id {problem.id!r}")
    except BadRow as exc:
      self.reject(location, exc.field, exc.reason, counted=False)
      return
    if problem is None:
      self.filtered += 1
      return
    self._ids.add(problem.id)
    self.problems.append(problem)

  def keep(self, indices) -> None:
    """Keeps the problems at `indices` (in that order); the others count as filtered."""
    kept = [self.problems[i] for i in indices]
    self.filtered += len(self.problems) - len(kept)
    self.problems = kept

  def reject(self, location, field: str, reason: str, *, counted: bool = True) -> None:
    """Records a bad row found outside `add` (e.g. a line that is not JSON)."""
    self.read += counted
    logging.warning("%s: bad row at %s (%s): %s", self.kind, location, field, reason)
    self.bad.append((location, field, reason))

  def finish(self, paths: list[str], report: dict | None) -> list[Problem]:
    """The problems; raises ValueError when none of the rows was good."""
    if report is not None:
      report.update(rows=self.read, problems=len(self.problems), bad_rows=len(self.bad),
                    bad=list(self.bad), filtered=self.filtered)
    if not self.problems:
      shown = "; ".join(f"{loc} ({field}): {reason}" for loc, field, reason in self.bad[:3])
      raise ValueError(
          f"No usable {self.kind} problem in {', '.join(paths)}: {self.read} rows read, "
          f"{len(self.bad)} bad, {self.filtered} filtered out by the options"
          + (f"; first bad rows: {shown}" if shown else "") + ".")
    return self.problems


def location(paths: list[str], path: str, position: int):
  """A row's location: its line or index, prefixed with the file name when several."""
  return position if len(paths) == 1 else f"{os.path.basename(path)}:{position}"


def files(path: str, patterns: tuple[str, ...], kind: str) -> list[str]:
  """`path` itself, or the files in directory `path` matching `patterns`, sorted."""
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{kind} data path {path!r} does not exist.")
  found = sorted({f for p in patterns for f in glob.glob(os.path.join(path, p))})
  if not found:
    raise FileNotFoundError(
        f"No {kind} file in directory {path!r} (looked for {', '.join(patterns)}).")
  return found


def jsonl_rows(path: str, rows: Rows, paths: list[str]) -> Iterator[tuple[Any, Any]]:
  """(location, parsed object) of each non-blank line; unparsable lines are bad rows."""
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = location(paths, path, number)
      try:
        yield where, json.loads(line)
      except ValueError as exc:
        rows.reject(where, "line", f"not valid JSON ({exc})")


def json_list(path: str) -> list:
  """The top-level JSON list of `path`; a file that is not one is an error naming it."""
  with open(path, encoding="utf-8") as f:
    try:
      data = json.load(f)
    except ValueError as exc:
      raise ValueError(f"{path!r} is not a JSON file: {exc}") from exc
  if not isinstance(data, list):
    raise ValueError(f"{path!r} must hold a JSON list, got {type(data).__name__}.")
  return data


def records(path: str, rows: Rows, paths: list[str],
            columns: tuple[str, ...] | None = None) -> Iterator[tuple[Any, Any]]:
  """(location, row dict) of a .jsonl, .json (a list) or .parquet file.

  Parquet is read column-selectively: only `columns` that the file has (all when None).
  JSONL locations are 1-based line numbers; JSON and parquet ones 0-based indices.
  """
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    schema = pq.read_schema(path)
    wanted = None if columns is None else [c for c in columns if c in schema.names]
    table = pq.read_table(path, columns=wanted)
    for index, row in enumerate(table.to_pylist()):
      yield location(paths, path, index), row
  elif path.endswith(".json"):
    for index, row in enumerate(json_list(path)):
      yield location(paths, path, index), row
  else:
    yield from jsonl_rows(path, rows, paths)


def field(row: Any, name: str, kind: type | tuple[type, ...] = str, *,
          optional: bool = False) -> Any:
  """`row[name]` checked to be a `kind` (a non-blank string for str); BadRow if not.

  With `optional`, a missing, null or blank value gives None.
  """
  if not isinstance(row, dict):
    raise BadRow("row", f"expected a JSON object, got {type(row).__name__}")
  if name not in row or row[name] is None:
    if optional:
      return None
    raise BadRow(name, "missing")
  value = row[name]
  kinds = kind if isinstance(kind, tuple) else (kind,)
  if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
    raise BadRow(name, f"expected {_kind_name(kind)}, got {type(value).__name__} "
                 f"{_short(value)}")
  if isinstance(value, str) and not value.strip():
    if optional:
      return None
    raise BadRow(name, "empty")
  return value


def first_field(row: Any, names: tuple[str, ...], kind=str) -> Any:
  """The first of `names` present in `row` (see `field`); BadRow naming all if none is."""
  for name in names:
    if isinstance(row, dict) and row.get(name) is not None:
      return field(row, name, kind)
  raise BadRow("/".join(names), "missing")


def answer_text(value: Any, name: str) -> str:
  """A gold answer as text (numbers allowed); BadRow if empty or of another type."""
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    raise BadRow(name, f"expected a string or a number, got {_short(value)}")
  text = str(value).strip()
  if not text:
    raise BadRow(name, "empty")
  return text


def _kind_name(kind) -> str:
  kinds = kind if isinstance(kind, tuple) else (kind,)
  return " or ".join(k.__name__ for k in kinds)


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + "..."
