"""Two processes x 2 fake CPU devices (launch/local.sh, 127.0.0.1) against one process
with 4 devices: same per-step metrics, each rollout verified once on the process that
holds it, SIGKILL of one process then resume on one process, SIGTERM of one process then
resume, and checkpoints restored onto the other process count both ways; the split step
(jit(sample) -> host verify -> jit(update)) on two processes too.

Each child process compiles the fused step anew (a step with a host callback never enters
the persistent compilation cache), so the runs are shared: the interrupted runs start
from or continue into the restores onto the other process count."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mopd_jax import metrics
from tests import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
RUN_TIMEOUT = 900


def _flags(base_dir, workdir, total_steps=STEPS):
  flags = {"model.cache_dir": base_dir, "data.batch_size": 4, "sampling.num_samples": 4,
           "sampling.max_response_len": 28, "peers.peer_cap": 28, "eval.num_prompts": 8,
           "eval.num_samples": 2, "total_steps": total_steps, "checkpoint_every": 2,
           "eval_every": 0, "loss.chunk_size": 8, "mesh.shape": "(4,1,1)"}
  return (["--config=configs/code.py", f"--workdir={workdir}"]
          + [f"--config.{k}={v}" for k, v in flags.items()])


def _clean_env(devices=None):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("JAX_") or k in conftest.CACHE_VARIABLES}
  if devices:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + f" --xla_force_host_platform_device_count={devices}")
  return env


def _local_sh(args, num_processes=2, devices=2, grace_s=20):
  return ["bash", "launch/local.sh", f"--num_processes={num_processes}",
          f"--devices_per_process={devices}", f"--python={sys.executable}",
          f"--grace_s={grace_s}", "--"] + args


def _run_two(args):
  out = subprocess.run(_local_sh(args), cwd=ROOT, env=_clean_env(), capture_output=True,
                       text=True, timeout=RUN_TIMEOUT)
  assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
  return out.stdout


def _run_one(args):
  out = subprocess.run([sys.executable, "-m", "mopd_jax.main"] + args, cwd=ROOT,
                       env=_clean_env(devices=4), capture_output=True, text=True,
                       timeout=RUN_TIMEOUT)
  assert out.returncode == 0, out.stderr[-6000:]
  return out.stderr


def _train_metrics(workdir):
  """Per-step training metrics, without wall-clock timings."""
  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return [{k: v for k, v in r.items() if not k.endswith("time_s")}
          for r in rows if "train/loss" in r]


def _assert_close(a, b):
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for ra, rb in zip(a, b):
    assert ra.keys() == rb.keys()
    for k in ra:
      assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-5), (ra["step"], k)


@pytest.fixture(scope="session")
def runs(tiny_base_dir, tmp_path_factory):
  """Workdirs and logs of the same 4-step run on 1 process x 4 devices and 2 x 2 (made
  once per test run, shared by the xdist workers)."""
  def build(path):
    for name, run in (("one", _run_one), ("two", _run_two)):
      workdir = os.path.join(path, name)
      log = run(_flags(tiny_base_dir, workdir))
      with open(workdir + ".log", "w") as f:
        f.write(log)
  path = conftest.built_once(tmp_path_factory, "multihost_runs", build)
  out = {}
  for name in ("one", "two"):
    out[name] = os.path.join(path, name)
    with open(out[name] + ".log") as f:
      out[name + "_log"] = f.read()
  return out


@pytest.mark.slow
def test_two_processes_match_one_process(runs):
  one, two = _train_metrics(runs["one"]), _train_metrics(runs["two"])
  assert len(one) == STEPS
  _assert_close(one, two)
  log = runs["two_log"]
  # Every process logs its start-up line; only process 0 writes.
  for i, devices in ((0, "'cpu:0', 'cpu:1'"), (1, "'cpu:2048', 'cpu:2049'")):
    assert f"[process {i}] " in log
    assert re.search(rf"\[process {i}\].*Process {i} of 2 \(environment\): 2 local devices "
                     rf"\[{devices}\]", log)
  for name in ("metrics.jsonl", "summary.json", "config.json", "tensorboard"):
    assert os.path.exists(os.path.join(runs["two"], name)), name
  with open(os.path.join(runs["two"], "summary.json")) as f:
    assert json.load(f)["processes"] == 2
  # Rows: 4 steps x 16 train rollouts + 2 evaluations x 16, split evenly; one host
  # call per local data shard in the step (2 per process, 4 on one process) and one per
  # process and evaluation.
  for i in range(2):
    assert re.search(rf"Process {i} verified 48 rows in 10 calls", log), i
  assert "Process 0 verified 96 rows in 18 calls" in runs["one_log"]


_VERIFY_SCRIPT = r"""
import json, os, sys
num_processes, process_id, port, base_dir, out = sys.argv[1:]
num_processes, process_id = int(num_processes), int(process_id)
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + f"--xla_force_host_platform_device_count={4 // num_processes}"
sys.path.insert(0, os.getcwd())
import jax, numpy as np
from mopd_jax import distributed, settings, train, train_step
from mopd_jax.verifiers.result import Result
from tests.conftest import tiny_config

overrides = {"mesh.shape": (4, 1, 1)}
if num_processes > 1:
  overrides.update({"distributed.mode": "explicit", "distributed.num_processes": 2,
                    "distributed.process_id": process_id,
                    "distributed.coordinator_address": f"127.0.0.1:{port}"})
st = settings.from_config(tiny_config(base_dir, **overrides))
distributed.initialize(st.distributed)

def scorer(texts, refs):
  return [Result(reward=float(sum(map(ord, t)) % 2), status="ok") for t in texts]

s = train.setup(st, score_batch=scorer)
calls = []
verifier = s.host_verifier
def recording(ids, tokens, lengths):
  calls.append([int(i) for i in ids])
  return verifier(ids, tokens, lengths)
s.host_verifier = recording
state, step = s.init_state(), s.train_step()
result = {"steps": [], "split_steps": []}
for i in range(2):
  calls.clear()
  state, m = step(state, s.batch(i))
  m = {k: float(v) for k, v in jax.device_get(m).items()}
  result["steps"].append({"calls": list(calls), "metrics": m,
                          "batch_ids": s.train_batches.batch(i)["example_id"].tolist()})
# The same two steps as jit(sample) -> host verify -> jit(update).
split = train_step.make_split_step(s.step_cfg, s.mesh, s.host_verifier, s.optimizer,
                                   s.pieces, s.shardings)
state = s.init_state()
for i in range(2):
  calls.clear()
  state, m = split(state, s.batch(i))
  m = {k: float(v) for k, v in jax.device_get(m).items()}
  result["split_steps"].append({"calls": list(calls), "metrics": m})
with open(out, "w") as f:
  json.dump(result, f)
"""


@pytest.mark.slow
def test_each_rollout_is_verified_once_on_the_process_that_holds_it(tiny_base_dir,
                                                                     tmp_path):
  port = str(_free_port())
  outs = [str(tmp_path / f"p{i}.json") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-c", _VERIFY_SCRIPT, "2", str(i), port,
                             tiny_base_dir, outs[i]], cwd=ROOT, env=_clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=RUN_TIMEOUT)
    assert p.returncode == 0, err[-4000:]
  single = str(tmp_path / "single.json")
  out = subprocess.run([sys.executable, "-c", _VERIFY_SCRIPT, "1", "0", port, tiny_base_dir,
                        single], cwd=ROOT, env=_clean_env(), capture_output=True, text=True,
                       timeout=RUN_TIMEOUT)
  assert out.returncode == 0, out.stderr[-4000:]
  results = []
  for path in outs:
    with open(path) as f:
      results.append(json.load(f))
  with open(single) as f:
    one = json.load(f)
  for step in range(2):
    ids = results[0]["steps"][step]["batch_ids"]
    expected = sorted(i for i in ids for _ in range(4))  # G = 4 rollouts per prompt
    per_process = [r["steps"][step]["calls"] for r in results]
    # Two local data shards per process -> two host calls of 4 rows each.
    assert [[len(c) for c in calls] for calls in per_process] == [[4, 4], [4, 4]]
    # Process 0 verifies the first two prompts' rollouts, process 1 the last two.
    assert sorted(sum(per_process[0], [])) == sorted(i for i in ids[:2] for _ in range(4))
    assert sorted(sum(per_process[1], [])) == sorted(i for i in ids[2:] for _ in range(4))
    assert sorted(sum(per_process[0] + per_process[1], [])) == expected
    two_m, one_m = results[0]["steps"][step]["metrics"], one["steps"][step]["metrics"]
    assert results[1]["steps"][step]["metrics"] == two_m
    for k in one_m:
      assert two_m[k] == pytest.approx(one_m[k], rel=1e-4, abs=1e-5), k
    # The split step verifies the same rows on the same processes (in one host call per
    # process) and gets the same step.
    for r in results + [one]:
      assert (sorted(sum(r["split_steps"][step]["calls"], []))
              == sorted(sum(r["steps"][step]["calls"], [])))
      for k, v in r["steps"][step]["metrics"].items():
        if not k.endswith("time_s"):
          assert r["split_steps"][step]["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
  # The scorer gives mixed rewards, so rewards and peer masks are really compared.
  rewards = [s["metrics"]["train/reward_mean"] for s in one["steps"]]
  assert all(0 < r < 1 for r in rewards)


def _free_port():
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_for_step(workdir, step, proc, timeout=RUN_TIMEOUT):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, "run ended before it could be interrupted"
    if os.path.exists(path):
      steps = [json.loads(l)["step"] for l in open(path) if l.strip()]
      if steps and max(steps) >= step:
        return
    time.sleep(0.05)
  raise TimeoutError(f"step {step} not reached")


@pytest.fixture(scope="session")
def two_to_one(tiny_base_dir, tmp_path_factory):
  """A 2-process run killed by SIGKILL of one process after its step-2 checkpoint, then
  resumed by one process (4 devices: a crashed pod may come back smaller) and run on to
  step STEPS + 2: (workdir, seconds from the kill to the launcher's exit). Made once per
  test run, shared by the xdist workers."""
  path = conftest.built_once(tmp_path_factory, "multihost_two_to_one",
                             lambda path: _kill_then_resume_on_one(tiny_base_dir, path))
  with open(os.path.join(path, "stop_s")) as f:
    return os.path.join(path, "run"), float(f.read())


def _kill_then_resume_on_one(tiny_base_dir, path):
  workdir = os.path.join(path, "run")
  os.makedirs(workdir)
  log_path = os.path.join(path, "launcher.log")
  with open(log_path, "w") as log:
    # The surviving process waits on its dead peer in a collective, where no signal
    # handler runs: the launcher's SIGKILL after the grace period ends it.
    launcher = subprocess.Popen(_local_sh(_flags(tiny_base_dir, workdir), grace_s=3),
                                cwd=ROOT, env=_clean_env(), stdout=subprocess.DEVNULL,
                                stderr=log, text=True)
    _wait_for_step(workdir, 3, launcher)  # the checkpoint of step 2 is on disk
    with open(log_path) as f:
      pid = int(re.search(r"process 1 is pid (\d+)", f.read()).group(1))
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    # The launcher stops the other process (SIGTERM, then SIGKILL after 3 s).
    assert launcher.wait(timeout=120) != 0
    stop_s = time.time() - killed
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  assert 2 in [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
               if d.isdigit()]
  _run_one(_flags(tiny_base_dir, workdir, total_steps=STEPS + 2))
  with open(os.path.join(path, "stop_s"), "w") as f:
    f.write(str(stop_s))


@pytest.mark.slow
def test_sigkill_of_one_process_stops_the_run_and_resume_on_one_process_matches(
    runs, two_to_one):
  """The kill stops both processes; the checkpoint two processes wrote restores onto one
  process, which continues the uninterrupted run's metrics."""
  workdir, stop_s = two_to_one
  assert stop_s < 120
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["resumed_from_step"] in (2, 3)
  resumed = _train_metrics(workdir)
  assert [r["step"] for r in resumed] == list(range(1, STEPS + 3))
  _assert_close(_train_metrics(runs["two"]), resumed[:STEPS])


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_resume_matches(
    runs, two_to_one, tiny_base_dir, tmp_path):
  """Step 4 written by one process is continued by two (checkpoints restore onto the
  other process count both ways, with `two_to_one`); a preemption notice (SIGTERM)
  reaching process 1 alone then makes both processes save the same step through JAX's
  preemption service and exit cleanly, with no collective per step; resumed again, the
  run has the metrics of the uninterrupted and of the 2 -> 1 process runs."""
  workdir = str(tmp_path / "one_to_two")
  shutil.copytree(runs["one"], workdir)
  os.remove(os.path.join(workdir, "summary.json"))
  total = STEPS + 4  # room for the step the processes agree on
  log_path = tmp_path / "launcher.log"
  with open(log_path, "w") as log:
    launcher = subprocess.Popen(_local_sh(_flags(tiny_base_dir, workdir, total_steps=total)),
                                cwd=ROOT, env=_clean_env(), stdout=log,
                                stderr=subprocess.STDOUT, text=True)
    _wait_for_step(workdir, STEPS + 1, launcher)
    pid = int(re.search(r"process 1 is pid (\d+)", log_path.read_text()).group(1))
    os.kill(pid, signal.SIGTERM)
    assert launcher.wait(timeout=RUN_TIMEOUT) == 0, log_path.read_text()[-6000:]
  text = log_path.read_text()
  # Both processes restored the one-process checkpoint of step 4.
  for i in range(2):
    assert re.search(rf"\[process {i}\].*Resumed from step {STEPS} ", text), text[-6000:]
  stopped = {int(i): int(s) for i, s in re.findall(
      r"\[process (\d)\].*Preemption notice \(SIGTERM\) received by a process: saved step "
      r"(\d+), stopping", text)}
  assert stopped.keys() == {0, 1} and stopped[0] == stopped[1], text[-6000:]
  assert STEPS < stopped[0] < total
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  _run_two(_flags(tiny_base_dir, workdir, total_steps=total))
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["resumed_from_step"] == stopped[0]
  resumed = _train_metrics(workdir)
  assert [r["step"] for r in resumed] == list(range(1, total + 1))
  _assert_close(_train_metrics(runs["one"]), resumed[:STEPS])
  _assert_close(_train_metrics(runs["two"]), resumed[:STEPS])
  # Steps 5-6 continued from a 1-process checkpoint on 2 processes equal those continued
  # from a 2-process checkpoint on 1 process.
  _assert_close(_train_metrics(two_to_one[0])[STEPS:], resumed[STEPS:STEPS + 2])
