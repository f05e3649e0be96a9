"""The README's demo command end to end.

`test_demo_command_*` runs the command on the session's tiny cached base model for three
steps: every output the README names, and a quiet start. The full demo (base model
pretraining on a fresh cache, then 60 steps; 5-10 minutes on 2 cores) checks that
held-out success improves, as the README claims; it runs where MOPD_JAX_DEMO_LEARNING=1
(CI's second pytest call, see `.ci/run`), so that the default suite stays short.
"""

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = [sys.executable, "-m", "mopd_jax.main", "--config=configs/code.py"]
STEPS = 3

# What a new user must not see on a CPU machine: TensorFlow / CUDA start-up errors, absl
# error or fatal lines (E1204 ..., F1204 ...), tracebacks.
_NOISE = re.compile(r"cuInit|CUDA|cuda_|tensorflow|TensorFlow|Traceback|^[EF]\d{4} ",
                    re.MULTILINE)


@pytest.fixture(scope="module")
def tiny_demo(tiny_base_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("demo") / "run"
  flags = {"model.cache_dir": tiny_base_dir, "data.batch_size": 4, "sampling.num_samples": 4,
           "sampling.max_response_len": 28, "peers.peer_cap": 28, "eval.num_prompts": 8,
           "eval.num_samples": 2, "total_steps": STEPS, "checkpoint_every": 0,
           "eval_every": 0, "loss.chunk_size": 8}
  proc = subprocess.run(COMMAND + [f"--workdir={workdir}"]
                        + [f"--config.{k}={v}" for k, v in flags.items()],
                        cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, proc


def test_demo_command_writes_every_output_the_readme_names(tiny_demo):
  workdir, _ = tiny_demo
  with open(workdir / "summary.json") as f:
    summary = json.load(f)
  assert summary["steps"] == STEPS
  for key in ("eval_success_before", "eval_success_after", "compile_time_s",
              "step_time_median_s"):
    assert key in summary
  lines = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [l["step"] for l in lines if "train/loss" in l] == list(range(1, STEPS + 1))
  for key in ("train/reward_mean", "train/success_rate", "train/loss",
              "train/reprompt_fraction"):
    assert all(key in l for l in lines if "train/loss" in l)
  assert any("eval/mean@2" in l and "eval/pass@2" in l for l in lines)
  assert os.listdir(workdir / "tensorboard")
  assert str(STEPS) in os.listdir(workdir / "checkpoints")


def test_demo_command_starts_quietly(tiny_demo):
  _, proc = tiny_demo
  output = proc.stdout + proc.stderr
  noise = [m.group(0) for m in _NOISE.finditer(output)]
  assert not noise, f"noisy start ({noise}):\n{output[-3000:]}"
  # What a new user is meant to see: the sandbox's isolation line, the memory plan and
  # the progress bar.
  assert "isolation" in output and "Memory plan per device" in output
  assert f"step {STEPS}/{STEPS}" in output


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MOPD_JAX_DEMO_LEARNING") != "1",
                    reason="the full demo (5-10 min) runs where MOPD_JAX_DEMO_LEARNING=1 "
                    "(CI's second pytest call)")
def test_default_demo_improves_heldout_success(tmp_path):
  env = dict(os.environ, MOPD_JAX_CACHE=str(tmp_path / "cache"))
  workdir = tmp_path / "run"
  proc = subprocess.run(COMMAND + [f"--workdir={workdir}"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(workdir / "summary.json") as f:
    summary = json.load(f)
  assert summary["steps"] == 60
  before, after = summary["eval_success_before"], summary["eval_success_after"]
  assert 0.1 < before < 0.8  # a student that is neither hopeless nor saturated
  assert after > before + 0.1
  lines = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [l["step"] for l in lines if "train/loss" in l] == list(range(1, 61))
  assert any("eval/mean@4" in l and "eval/pass@4" in l for l in lines)
  assert "60" in os.listdir(workdir / "checkpoints")
