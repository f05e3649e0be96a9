r"""MOPD on tool use: ToolAlpaca (Action / Action Input calls graded against the gold calls).

Trains on ToolAlpaca's training file (the tool calls of each instance's intermediate steps)
and evaluates on `eval_simulated.json` (or `eval_real.json`). The default runs a few steps on
the small native-format fixtures in tests/data with the demo model:

  python -m mopd_jax.main --config=configs/tooluse.py --workdir=/tmp/mopd_tooluse

Paper scale (MOPD spec section 5; the paper's tool-use results are on Qwen3-8B):

  python -m mopd_jax.main --config=configs/tooluse.py:qwen3_8b --workdir=/tmp/tool_q8b \
      --config.model.checkpoint=/ckpt/Qwen3-8B --config.data.cache_dir=/tmp/tool_q8b_data \
      --config.data.path=/data/ToolAlpaca/data/train_data.json \
      --config.data.eval_path=/data/ToolAlpaca/data/eval_simulated.json

Evaluating on BFCL's single-call items instead (read out of the bfcl-eval wheel):
`--config.data.eval_source=bfcl --config.data.eval_path=/data/wheels`.
"""

from mopd_jax import domain_config

PRESETS = domain_config.PRESETS


def get_config(arg=None):
  """arg: None / 'local' (fixtures, demo model) or a paper-scale preset of PRESETS."""
  return domain_config.get_config(
      arg, config_file="configs/tooluse.py", task="tooluse", source="toolalpaca",
      local_paths={"path": "toolalpaca/train_data.json",
                   "eval_path": "toolalpaca/eval_simulated.json"},
      needs_eval_path=True)  # paper scale: train_data.json, eval_simulated / eval_real.json
