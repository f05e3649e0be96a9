r"""MOPD on science QA: SciKnowEval multiple choice, level L3 with 2 or 4 options.

The paper keeps level L3 questions with 2 or 4 choices of one SciKnowEval domain and splits
them 90/10 with seed 42 (the reader's defaults); the answer is the letter inside
<answer></answer>. The default runs a few steps on the small native-format fixture in
tests/data with the demo model:

  python -m mopd_jax.main --config=configs/science.py --workdir=/tmp/mopd_science

Paper scale (MOPD spec section 5; the paper's science results are on Qwen3-8B):

  python -m mopd_jax.main --config=configs/science.py:qwen3_8b --workdir=/tmp/sci_q8b \
      --config.model.checkpoint=/ckpt/Qwen3-8B --config.data.cache_dir=/tmp/sci_q8b_data \
      --config.data.path=/data/SciKnowEval/chemistry.jsonl
"""

import os

import ml_collections

from mopd_jax import settings

PRESETS = ("local", "qwen3_4b", "qwen3_8b")
_FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                         "data")


def get_config(arg=None):
  """arg: None / 'local' (fixture, demo model) or a paper-scale preset of PRESETS."""
  arg = arg or "local"
  if arg not in PRESETS:
    raise ValueError(f"Unknown preset {arg!r} for configs/science.py; available: {PRESETS}.")
  c = settings.base_config(seed=42, total_steps=200, checkpoint_every=50, keep_checkpoints=3,
                           eval_every=5, log_every=1)
  c.data.task = "science"
  c.data.source = "sciknoweval"
  c.data.options = '{"split": "train"}'
  c.data.eval_options = '{"split": "test"}'
  if arg == "local":
    return _local(c)
  placeholder = ml_collections.config_dict.placeholder
  c.model.checkpoint = placeholder(str)  # required: a Hugging Face checkpoint directory
  c.model.preset = {"qwen3_4b": "qwen3-4b", "qwen3_8b": "qwen3-8b"}[arg]
  c.model.dtype = "bfloat16"
  c.data.path = placeholder(str)  # required: a SciKnowEval JSONL file (one domain)
  c.data.batch_size = 32
  c.data.max_prompt_len = 2048
  c.mesh.shape = (1, -1, 1)  # FSDP over all devices
  return c


def _local(c):
  """A few steps on the fixture with the demo model, small enough for a CPU."""
  c.total_steps, c.checkpoint_every, c.eval_every = 3, 0, 0
  c.model.checkpoint = "demo"
  c.data.path = os.path.join(_FIXTURES, "sciknoweval", "chemistry.jsonl")
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
