"""The README's demo command on a fresh cache: builds the base model, trains, and
improves held-out success (exactly what the README claims)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_default_demo_improves_heldout_success(tmp_path):
  env = dict(os.environ, MOPD_JAX_CACHE=str(tmp_path / "cache"))
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "mopd_jax.main", "--config=configs/code.py",
                         f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(workdir / "summary.json") as f:
    summary = json.load(f)
  assert summary["steps"] == 60
  before, after = summary["eval_success_before"], summary["eval_success_after"]
  assert 0.1 < before < 0.8  # a student that is neither hopeless nor saturated
  assert after > before + 0.1
  lines = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  train_steps = [l["step"] for l in lines if "train/loss" in l]
  assert train_steps == list(range(1, 61))
  for key in ("train/reward_mean", "train/success_rate", "train/loss",
              "train/reprompt_fraction"):
    assert all(key in l for l in lines if "train/loss" in l)
  assert any("eval/mean@4" in l and "eval/pass@4" in l for l in lines)
  assert os.listdir(workdir / "tensorboard")
  assert "60" in os.listdir(workdir / "checkpoints")
