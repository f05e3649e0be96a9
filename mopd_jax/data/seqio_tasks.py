"""The demo code task as a seqio Task (this module imports TensorFlow).

Task `mopd_demo_code`: the parametrised function-writing problems of `demo_problems`,
splits `train` and `heldout`, feature `inputs` = the problem statement tokenised with a
seqio SentencePiece vocabulary. `tokenize_split` materialises a split in the order of
the source (no shuffling here: the training order is decided by `pipeline`), wraps each
prompt in the chat format and returns a `cache.TokenizedSplit`.
"""

from __future__ import annotations

import json

import numpy as np
import seqio
import tensorflow as tf

from mopd_jax import tokenizers
from mopd_jax.data import cache, demo_problems

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
