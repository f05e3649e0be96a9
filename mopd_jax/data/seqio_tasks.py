"""seqio Tasks of the demo and of the real-data domains (this module imports TensorFlow).

Task `mopd_demo_code`: the parametrised function-writing problems of `demo_problems`,
splits `train` and `heldout`, feature `inputs` = the problem statement tokenised with a
seqio SentencePiece vocabulary. `tokenize_split` materialises a split in the order of
the source (no shuffling here: the training order is decided by `pipeline`), wraps each
prompt in the chat format and returns a `cache.TokenizedSplit`.

Tasks `mopd_code`, `mopd_math`, `mopd_science`, `mopd_tooluse` (`register_source_task`):
splits `train` and `heldout` read by `data.sources` from the files each `SplitSpec` names
(see `source_splits`), with text features `inputs` (the user message), `system` (the
system prompt, often empty), `reference` (JSON), `problem_id`, `example_id` and `source`
(the name per-source evaluation metrics carry). They are
not tokenised by seqio: prompts are rendered with the model's chat template by
`cache.tokenize_examples`, which writes the TF-free cache.
Each registered task keeps the load report of each split (`source_reports`).
"""

from __future__ import annotations

import json
import os

# TensorFlow's C++ start-up logs (CUDA probing on a host without a GPU, ...) are not
# this program's errors: quieted before the first import, unless the user set a level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# pylint: disable=wrong-import-position
import numpy as np
import seqio
import tensorflow as tf

from mopd_jax import tokenizers
from mopd_jax.data import cache, demo_problems, source_splits

TASK_NAME = "mopd_demo_code"
SPLITS = ("train", "heldout")


def _dataset_fn(split: str, shuffle_files: bool, seed=None):
  del shuffle_files, seed  # the source is small and ordered; shuffling is by step.
  ids = demo_problems.problem_ids(split)

  def generate():
    for i in ids:
      problem = demo_problems.get_problem(int(i))
      yield {"example_id": int(i), "inputs": problem.prompt,
             "reference": json.dumps(problem.tests)}

  return tf.data.Dataset.from_generator(generate, output_signature={
      "example_id": tf.TensorSpec((), tf.int64),
      "inputs": tf.TensorSpec((), tf.string),
      "reference": tf.TensorSpec((), tf.string)})


def register_demo_task(spm_path: str, name: str = TASK_NAME) -> seqio.Task:
  """Registers (once) and returns the demo task with the vocabulary at `spm_path`."""
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  vocab = seqio.SentencePieceVocabulary(spm_path)
  return seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(_dataset_fn, splits=SPLITS),
      preprocessors=[seqio.preprocessors.tokenize],
      output_features={"inputs": seqio.Feature(vocab, add_eos=False, dtype=tf.int32)},
      shuffle_buffer_size=None)


def tokenize_split(task: seqio.Task, split: str,
                   tokenizer: tokenizers.Tokenizer) -> cache.TokenizedSplit:
  """Chat-formatted, tokenised prompts of `split` (numpy, in source order)."""
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; allowed: {SPLITS}.")
  chat = tokenizers.ChatFormat()
  prefix = np.asarray(tokenizer.encode(chat.prefix), np.int32)
  suffix = np.asarray(tokenizer.encode(chat.suffix), np.int32)
  ids, prompts, inserts, refs = [], [], [], []
  ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1)
  for ex in ds.as_numpy_iterator():
    body = ex["inputs"].astype(np.int32)
    ids.append(int(ex["example_id"]))
    prompts.append(np.concatenate([prefix, body, suffix]))
    inserts.append(len(prefix) + len(body))
    refs.append(ex["reference"].decode("utf-8"))
  return cache.TokenizedSplit(
      example_id=np.asarray(ids, np.int64), prompts=prompts,
      insert_index=np.asarray(inserts, np.int32), references=refs,
      meta={"task": task.name, "split": split, "vocab_size": tokenizer.vocab_size})


_SOURCE_REPORTS: dict[str, dict] = {}
_TEXT_SIGNATURE = {
    "example_id": tf.TensorSpec((), tf.int64),
    "problem_id": tf.TensorSpec((), tf.string),
    "inputs": tf.TensorSpec((), tf.string),
    "reference": tf.TensorSpec((), tf.string),
    "system": tf.TensorSpec((), tf.string),
    "source": tf.TensorSpec((), tf.string),
}


def register_source_task(task: str, specs: dict) -> seqio.Task:
  """Registers (again, if it exists) task `mopd_<task>` over the splits of `specs`.

  Args:
    task: "code", "math", "science" or "tooluse" (source_splits.TASK_DOMAINS).
    specs: {"train": SplitSpec, "heldout": SplitSpec}.

  The sources are read here, once; a split without usable rows raises ValueError.
  """
  if set(specs) != set(source_splits.SPLITS):
    raise ValueError(f"specs must name the splits {source_splits.SPLITS}, got {sorted(specs)}.")
  name = f"mopd_{task}"
  examples, reports = {}, {}
  for split, spec in specs.items():
    problems, reports[split] = source_splits.load_split_problems(task, spec)
    examples[split] = source_splits.text_examples(problems, split, spec.kind)

  def dataset_fn(split: str, shuffle_files: bool, seed=None):
    del shuffle_files, seed  # served in source order; shuffling is by step (`pipeline`).
    rows = examples[split]
    return tf.data.Dataset.from_generator(lambda: iter(rows),
                                          output_signature=_TEXT_SIGNATURE)

  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  _SOURCE_REPORTS[name] = reports
  return seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(dataset_fn, splits=source_splits.SPLITS),
      preprocessors=[], output_features={}, shuffle_buffer_size=None)


def source_reports(task: seqio.Task) -> dict:
  """{split: load report} of a task made by `register_source_task`."""
  return _SOURCE_REPORTS[task.name]


def text_examples(dataset) -> list[dict]:
  """The rows of a tf.data dataset of text features as Python values, in order."""
  return [{"example_id": int(ex["example_id"]), "problem_id": ex["problem_id"].decode(),
           "inputs": ex["inputs"].decode("utf-8"), "reference": ex["reference"].decode("utf-8"),
           "system": ex["system"].decode("utf-8"), "source": ex["source"].decode("utf-8")}
          for ex in dataset.as_numpy_iterator()]


def source_split(task: seqio.Task, split: str, tokenizer) -> cache.TokenizedSplit:
  """The tokenised cache split of a source task (chat template, insertion index)."""
  dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1)
  report = source_reports(task)[split]
  return cache.tokenize_examples(
      text_examples(dataset), tokenizer,
      {"task": task.name, "split": split, "domain": source_splits.TASK_DOMAINS[
          task.name.removeprefix("mopd_")], "load": source_splits.report_counts(report)})
