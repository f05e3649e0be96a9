"""The block that the real-data config files (configs/math.py, science.py, tooluse.py)
share: a CPU smoke run on the small native-format fixtures of tests/data with the demo
model ('local'), or a paper-scale preset (MOPD spec section 5: Qwen3, 2S1F, B=32 x G=8,
lr 1e-5, bf16) that needs a Hugging Face checkpoint and the dataset's files.
"""

from __future__ import annotations

import os

import ml_collections

from mopd_jax import settings

PRESETS = ("local", "qwen3_4b", "qwen3_8b")
_MODEL_PRESETS = {"qwen3_4b": "qwen3-4b", "qwen3_8b": "qwen3-8b"}
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                        "data")


def get_config(arg, *, config_file: str, task: str, source: str, local_paths: dict,
               needs_eval_path: bool, **data) -> ml_collections.ConfigDict:
  """The config of one real-data domain.

  arg: None / 'local' or a paper-scale preset of PRESETS. task, source: config.data.task
  and .source; data: further config.data keys (eval_source, options, ...). local_paths:
  {"path": ..., "eval_path": ...} under tests/data for 'local'. needs_eval_path: the
  paper-scale presets require --config.data.eval_path (else the training path is used).
  """
  arg = arg or "local"
  if arg not in PRESETS:
    raise ValueError(f"Unknown preset {arg!r} for {config_file}; available: {PRESETS}.")
  c = settings.base_config(seed=42, total_steps=200, checkpoint_every=50, keep_checkpoints=3,
                           eval_every=5, log_every=1)
  c.data.task = task
  c.data.source = source
  for key, value in data.items():
    c.data[key] = value
  if arg == "local":
    return _local(c, local_paths)
  placeholder = ml_collections.config_dict.placeholder
  c.model.checkpoint = placeholder(str)  # required: a Hugging Face checkpoint directory
  c.model.preset = _MODEL_PRESETS[arg]
  c.model.dtype = "bfloat16"
  c.data.path = placeholder(str)  # required: the training file or directory
  if needs_eval_path:
    c.data.eval_path = placeholder(str)  # required: the evaluation file
  c.data.batch_size = 32
  c.data.max_prompt_len = 2048
  c.mesh.shape = (1, -1, 1)  # FSDP over all devices
  return c


def _local(c, local_paths):
  """A few steps on the fixtures with the demo model, small enough for a CPU."""
  c.total_steps, c.checkpoint_every, c.eval_every = 3, 0, 0
  c.model.checkpoint = "demo"
  for key, relative in local_paths.items():
    c.data[key] = os.path.join(FIXTURES, *relative.split("/"))
  c.data.batch_size = 2
  c.data.max_prompt_len = 384
  c.data.overlong = "truncate"
  c.sampling.num_samples = 2
  c.sampling.max_response_len = 16
  c.peers.peer_cap = 16
  # Room for the verifiers' longest message (500 characters), so feedback is never cut.
  c.peers.feedback_len = 512
  c.loss.chunk_size = 16
  c.teacher.ema_rate = 0.01
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 1
  c.eval.num_prompts = 2
  c.eval.num_samples = 2
  return c
