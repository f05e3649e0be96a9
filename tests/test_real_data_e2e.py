"""Each real-data config runs end to end on the native-format fixtures with the demo model,
through the command line, and reports its load counts in summary.json."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")

# The paper-scale LiveCodeBench preset, shrunk to the demo model and the fixture.
LCB_LOCAL = [
    "--config.model.checkpoint=demo", "--config.model.preset=", "--config.model.dtype=float32",
    f"--config.data.path={DATA}/livecodebench", "--config.data.options={\"split\": \"train\"}",
    "--config.data.eval_options={\"split\": \"test\"}", "--config.data.batch_size=2",
    "--config.data.max_prompt_len=384", "--config.data.overlong=truncate",
    "--config.sampling.num_samples=2", "--config.sampling.max_response_len=16",
    "--config.peers.peer_cap=16", "--config.peers.feedback_len=16",
    "--config.loss.chunk_size=16", "--config.eval.num_prompts=2",
    "--config.eval.num_samples=2", "--config.total_steps=3", "--config.checkpoint_every=0",
    "--config.eval_every=0", "--config.mesh.shape=(-1, 1, 1)",
]

CASES = {
    # config: (command-line overrides, train load counts, heldout load counts)
    "math.py": ([], {"rows": 5, "problems": 3, "bad_rows": 2, "filtered": 0},
                {"rows": 6, "problems": 3, "bad_rows": 3, "filtered": 0}),
    "science.py": ([], {"rows": 18, "problems": 10, "bad_rows": 4, "filtered": 4},
                   {"rows": 18, "problems": 2, "bad_rows": 4, "filtered": 12}),
    "tooluse.py": ([], {"rows": 5, "problems": 4, "bad_rows": 1, "filtered": 0},
                   {"rows": 5, "problems": 3, "bad_rows": 2, "filtered": 0}),
    "code.py:lcb": (LCB_LOCAL, {"rows": 10, "problems": 3, "bad_rows": 7, "filtered": 0},
                    {"rows": 10, "problems": 3, "bad_rows": 7, "filtered": 0}),
}


@pytest.mark.slow
@pytest.mark.parametrize("config", list(CASES))
def test_real_data_config_runs_on_fixtures(config, tiny_base_dir, tmp_path):
  overrides, train_load, heldout_load = CASES[config]
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "mopd_jax.main", f"--config=configs/{config}",
             f"--workdir={workdir}", f"--config.model.cache_dir={tiny_base_dir}",
             f"--config.data.cache_dir={tmp_path / 'data'}", *overrides]
  proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(workdir / "summary.json") as f:
    summary = json.load(f)
  assert summary["steps"] == 3
  assert summary["data"]["load"] == {"train": train_load, "heldout": heldout_load}
  assert summary["data"]["train"]["too_long"] == 0
  lines = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  train_lines = [line for line in lines if "train/loss" in line]
  assert [line["step"] for line in train_lines] == [1, 2, 3]
  assert all(0.0 <= line["train/reward_mean"] <= 1.0 for line in train_lines)
  assert "bad row" in proc.stderr
  cached = os.listdir(tmp_path / "data")
  assert sorted(name.split("_")[2] for name in cached) == ["heldout", "train"]
