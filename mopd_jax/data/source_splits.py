"""The problems of one split of a real-data task, as text examples (no TensorFlow here).

A task (`data.task`: "code", "math", "science" or "tooluse") trains on one source and
evaluates on another (or on another split of the same one): `SplitSpec(kind, path,
options)` names each, as `data.source` / `data.path` / `data.options` and their `eval_`
counterparts do. `load_split_problems` loads a split through `sources.load` and keeps the
problems of the task's domain (a mixed source such as `mopd_parquet` counts the others as
filtered). `text_examples` turns them into the rows that the seqio task serves and the
cache stores: an int example id (unique across the two splits), the prompt text, the
system prompt, the reference as JSON text and the source name that evaluation metrics are
grouped by (`source_name`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

from mopd_jax.choices import TASK_DOMAINS
from mopd_jax.data import sources

SPLITS = ("train", "heldout")
# Heldout example ids start here, so that train and heldout ids never collide in the host
# reference table (ids travel as int32 through the step).
HELDOUT_ID_OFFSET = 1 << 30


@dataclasses.dataclass(frozen=True)
class SplitSpec:
  """Where one split's problems come from: a source kind, a path and reader options."""

  kind: str
  path: str
  options: tuple = ()  # sorted (name, value) pairs, hashable

  @classmethod
  def make(cls, kind: str, path: str, options: dict | None = None) -> "SplitSpec":
    return cls(kind, path, tuple(sorted((options or {}).items())))

  def fingerprint(self, *extra) -> str:
    """Short digest of the spec (with the path made absolute) and `extra` values."""
    text = json.dumps([self.kind, os.path.abspath(self.path), self.options, *extra],
                      sort_keys=True, default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def split_specs(data) -> dict:
  """{"train": SplitSpec, "heldout": SplitSpec} of a real-data task's
  `settings.DataSettings` (the eval_ keys default to the training ones)."""
  return {"train": SplitSpec.make(data.source, data.path, json.loads(data.options)),
          "heldout": SplitSpec.make(data.eval_source or data.source,
                                    data.eval_path or data.path,
                                    json.loads(data.eval_options))}


def load_split_problems(task: str, spec: SplitSpec) -> tuple[list, dict]:
  """(problems of the task's domain, load report) of one split."""
  if task not in TASK_DOMAINS:
    raise ValueError(f"Unknown data task {task!r}; allowed: {tuple(TASK_DOMAINS)}.")
  report = {}
  problems = sources.load(spec.kind, spec.path, report=report, **dict(spec.options))
  domain = TASK_DOMAINS[task]
  kept = [p for p in problems if p.domain == domain]
  report["filtered"] += len(problems) - len(kept)
  report["problems"] = len(kept)
  if not kept:
    raise ValueError(f"No {domain} problem for task {task!r} in {spec.path!r} "
                     f"(source {spec.kind!r}; the {len(problems)} problems read are of "
                     f"other domains).")
  return kept, report


def source_name(problem, kind: str) -> str:
  """The source a problem's evaluation metrics are reported under.

  The dataset the row itself names (MMATH's `data_source`, the authors' parquet `dataset`,
  the AIME / HMMT file stem), else the source kind it was read with. Characters other than
  letters, digits, "_", "-" and "." become "_" (the name is part of metric keys).
  """
  meta = problem.meta
  name = meta.get("data_source") or meta.get("dataset") or meta.get("source") or kind
  return re.sub(r"[^A-Za-z0-9_.-]", "_", str(name))


def text_examples(problems, split: str, kind: str) -> list[dict]:
  """{"example_id", "problem_id", "inputs", "reference", "system", "source"} per problem.

  In order. "system" is the problem's system prompt (`meta["system"]`, as the authors'
  processed rows and some BFCL items carry), "" when it has none; "source" is
  `source_name(problem, kind)`, `kind` being the source kind the problems were read with.
  """
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; allowed: {SPLITS}.")
  offset = HELDOUT_ID_OFFSET if split == "heldout" else 0
  if len(problems) >= HELDOUT_ID_OFFSET:
    raise ValueError(f"{len(problems)} problems in one split; at most {HELDOUT_ID_OFFSET - 1}.")
  return [{"example_id": offset + i, "problem_id": p.id, "inputs": p.prompt,
           "reference": json.dumps(p.reference, ensure_ascii=False),
           "system": p.meta.get("system") or "", "source": source_name(p, kind)}
          for i, p in enumerate(problems)]


def report_counts(report: dict) -> dict:
  """The counts of a load report (what summary.json carries), without the row list."""
  return {key: report[key] for key in ("rows", "problems", "bad_rows", "filtered")}
