"""Readers of the datasets' native formats: `load(kind, path, **options) -> list[Problem]`.

  from mopd_jax.data import sources
  report = {}
  problems = sources.load("livecodebench", "lcb/", release="v6", report=report)

Each kind has one module here; its docstring describes the format and the options. A row
that cannot become a problem is logged with its location and the reason, counted and left
out; the load goes on. `report` (a dict) receives {"rows", "problems", "bad_rows", "bad":
[(line or index, field, reason), ...], "filtered", "files"}; locations are prefixed with
the file name when several files are read. A load without any good row is an error that
names the file(s).
"""

from __future__ import annotations

from mopd_jax.choices import SOURCE_KINDS
from mopd_jax.data.sources import (aime, bfcl, deepmath, humaneval, livecodebench, mmath,
                                   mopd_parquet, sciknoweval, toolalpaca)
from mopd_jax.data.sources import common
from mopd_jax.data.sources.common import DOMAINS, BadRow, Problem

__all__ = ["DOMAINS", "KINDS", "BadRow", "Problem", "load"]

_READERS = {
    "livecodebench": livecodebench.load,
    "deepmath": deepmath.load,
    "aime": aime.load,
    "sciknoweval": sciknoweval.load,
    "toolalpaca": toolalpaca.load,
    "mopd_parquet": mopd_parquet.load,
    "humaneval": humaneval.load,
    "mmath": mmath.load,
    "bfcl": bfcl.load,
}
KINDS = SOURCE_KINDS  # the readers' names, as the settings allow them


def load(kind: str, path: str, *, report: dict | None = None, **options) -> list[Problem]:
  """The problems of the `kind` dataset at `path` (a file, a directory or a wheel).

  Raises ValueError for an unknown kind or option, FileNotFoundError for a missing path,
  and ValueError naming the file(s) when no row is usable.
  """
  if kind not in _READERS:
    raise ValueError(f"Unknown data source kind {kind!r}; allowed: {KINDS}.")
  if not isinstance(path, str) or not path:
    raise ValueError(f"path must be a file or directory path, got {path!r}.")
  rows = common.Rows(kind)
  try:
    paths = _READERS[kind](path, rows, **options)
  except TypeError as exc:
    if "unexpected keyword argument" in str(exc):
      raise ValueError(f"Unknown option for source {kind!r}: {exc}") from exc
    raise
  problems = rows.finish(paths, report)
  if report is not None:
    report["files"] = list(paths)
  return problems
