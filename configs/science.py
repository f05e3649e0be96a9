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

from mopd_jax import domain_config

PRESETS = domain_config.PRESETS


def get_config(arg=None):
  """arg: None / 'local' (fixture, demo model) or a paper-scale preset of PRESETS."""
  return domain_config.get_config(
      arg, config_file="configs/science.py", task="science", source="sciknoweval",
      options='{"split": "train"}', eval_options='{"split": "test"}',
      local_paths={"path": "sciknoweval/chemistry.jsonl"},
      needs_eval_path=False)  # paper scale: one SciKnowEval JSONL file (one domain)
