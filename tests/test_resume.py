"""Interrupting a run (SIGTERM, or kill -9 after a checkpoint) and resuming it gives the
same metrics, step by step, as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mopd_jax import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 8


def _command(base_dir, workdir):
  flags = {"model.cache_dir": base_dir, "data.batch_size": 4, "sampling.num_samples": 4,
           "sampling.max_response_len": 28, "peers.peer_cap": 28, "eval.num_prompts": 8,
           "eval.num_samples": 2, "total_steps": TOTAL, "checkpoint_every": 2,
           "eval_every": 4, "loss.chunk_size": 8}
  return ([sys.executable, "-m", "mopd_jax.main", "--config=configs/code.py",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in flags.items()])


def _start(base_dir, workdir):
  return subprocess.Popen(_command(base_dir, workdir), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_step(workdir, step, proc, timeout=600):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, "run ended before it could be interrupted"
    if os.path.exists(path):
      steps = [json.loads(l)["step"] for l in open(path) if l.strip()]
      if steps and max(steps) >= step:
        return
    time.sleep(0.02)
  raise TimeoutError(f"step {step} not reached")


def _finish(base_dir, workdir):
  proc = subprocess.run(_command(base_dir, workdir), cwd=ROOT, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]


def _comparable(workdir):
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  # Wall-clock timings differ between runs; everything else must be identical.
  return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in rows]


@pytest.fixture(scope="module")
def reference(uninterrupted_run):
  return _comparable(uninterrupted_run)


@pytest.mark.slow
def test_sigterm_then_resume_matches(tiny_base_dir, tmp_path, reference):
  workdir = str(tmp_path)
  proc = _start(tiny_base_dir, workdir)
  _wait_for_step(workdir, 3, proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 0, proc.stderr.read()[-4000:]
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                 if d.isdigit())
  assert 3 <= steps[-1] < TOTAL  # saved at the step where the signal arrived
  _finish(tiny_base_dir, workdir)
  assert _comparable(workdir) == reference


@pytest.mark.slow
def test_kill9_after_checkpoint_then_resume_matches(tiny_base_dir, tmp_path, reference):
  workdir = str(tmp_path)
  proc = _start(tiny_base_dir, workdir)
  _wait_for_step(workdir, 5, proc)
  proc.kill()
  proc.wait(timeout=60)
  summary = os.path.join(workdir, "summary.json")
  assert not os.path.exists(summary)
  _finish(tiny_base_dir, workdir)
  assert _comparable(workdir) == reference
  with open(summary) as f:
    assert json.load(f)["resumed_from_step"] in (2, 4)
