"""Sandbox faults: one memory and process budget per run, broken workers, clean starts."""

import concurrent.futures
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pytest

from mopd_jax import settings
from mopd_jax.verifiers import code, sandbox, sandbox_cgroups

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXEC_HARNESS = "def run(payload, report_fd):\n  exec(payload.decode())\n"
BUDGET = 256 << 20

# Forks `n` children that each fill `mib` MiB and sleep; reports how many filled theirs.
FORK_TREE = """
import os, time
n, mib = {n}, {mib}
pipe_r, pipe_w = os.pipe()
for _ in range(n):
  if os.fork() == 0:
    block = bytearray(mib << 20)
    for i in range(0, len(block), 4096):
      block[i] = 1
    os.write(pipe_w, b"x")
    time.sleep(30)
    os._exit(0)
filled = 0
while filled < n:
  filled += len(os.read(pipe_r, n))
os.write(report_fd, str(filled).encode())
"""


def _available():
  return psutil.virtual_memory().available


@pytest.fixture(scope="module")
def budget_pool():
  limits = sandbox.Limits(memory_bytes=BUDGET, max_processes=8)
  with sandbox.SandboxPool(EXEC_HARNESS, num_workers=2, limits=limits) as pool:
    if pool.budget.kind is None:
      pytest.skip(f"no cgroup on this host: {pool.budget.reason}")
    yield pool


def test_fork_tree_within_the_budget_completes(budget_pool):
  run = budget_pool.run(FORK_TREE.format(n=3, mib=40).encode(), 20.0)
  assert (run.report, run.timed_out, run.stopped_by) == (b"3", False, ""), run


def test_fork_tree_past_the_budget_is_stopped_as_a_whole(budget_pool):
  """4 x 200 MiB: each child is within its own 256 MiB address space, the tree is not."""
  before = _available()
  lowest = [before]
  sampling = threading.Event()

  def sample():
    while not sampling.is_set():
      lowest[0] = min(lowest[0], _available())
      time.sleep(0.01)

  sampler = threading.Thread(target=sample)
  sampler.start()
  with concurrent.futures.ThreadPoolExecutor(1) as other:
    bystander = other.submit(budget_pool.run, b"import os, time\ntime.sleep(1.0)\n"
                             b"os.write(report_fd, b'fine')", 20.0)
    run = budget_pool.run(FORK_TREE.format(n=4, mib=200).encode(), 20.0)
    assert bystander.result().report == b"fine"  # The other worker is unaffected.
  sampling.set()
  sampler.join()
  assert run.timed_out and run.stopped_by == "memory_budget", run
  assert run.report == b"" and run.wall_s < 15.0
  assert "memory budget" in run.reason
  # The whole tree held at most the budget (plus what other programs on the host did).
  assert before - lowest[0] < BUDGET + (200 << 20), (before - lowest[0]) >> 20
  for group in budget_pool.budget.describe()["groups"]:
    for slot in os.listdir(group):
      if os.path.isdir(os.path.join(group, slot)):
        assert sandbox_cgroups.members(os.path.join(group, slot)) == []
  assert budget_pool.run(b"import os\nos.write(report_fd, b'next')", 5.0).report == b"next"


def test_process_cap_per_run(budget_pool):
  program = (
      "import os, time\nforked = 0\nfor _ in range(50):\n  try:\n    if os.fork() == 0:\n"
      "      time.sleep(5)\n      os._exit(0)\n    forked += 1\n  except OSError:\n    break\n"
      "os.write(report_fd, str(forked).encode())\n")
  run = budget_pool.run(program.encode(), 10.0)
  assert 0 < int(run.report) <= 7, run  # 8 tasks: the run itself and 7 children.
  for group in budget_pool.budget.describe()["groups"]:
    if "pids" in group or budget_pool.budget.kind == "v2":
      with open(os.path.join(group, "slot-0", "pids.max"), encoding="ascii") as f:
        assert f.read().strip() == "8"


def test_set_limits_changes_the_budget_of_later_runs():
  with sandbox.SandboxPool(EXEC_HARNESS, num_workers=1,
                           limits=sandbox.Limits(memory_bytes=BUDGET)) as pool:
    if pool.budget.kind is None:
      pytest.skip(f"no cgroup on this host: {pool.budget.reason}")
    tree = FORK_TREE.format(n=4, mib=40).encode()  # 160 MiB in all.
    assert pool.run(tree, 20.0).report == b"4"
    pool.set_limits(sandbox.Limits(memory_bytes=128 << 20))
    assert pool.run(tree, 20.0).stopped_by == "memory_budget"
    assert pool.isolation["limits"]["memory_bytes"] == 128 << 20
    assert pool.isolation["run_budget"]["memory_bytes"] == 128 << 20
    with pytest.raises(TypeError, match="sandbox.Limits"):
      pool.set_limits({"memory_bytes": 1})


def test_memory_budget_setting_is_validated():
  assert settings.VerifierSettings().memory_bytes == 1 << 30
  with pytest.raises(settings.ConfigError,
                     match=r"config\.verifier\.memory_bytes = 1000: must be an integer number "
                           r"of bytes >= 16777216"):
    settings.VerifierSettings(memory_bytes=1000)


def test_without_a_cgroup_the_report_says_so(monkeypatch):
  monkeypatch.setattr(sandbox_cgroups, "own_cgroup_dirs", dict)
  with sandbox.SandboxPool(EXEC_HARNESS, num_workers=1) as pool:
    assert pool.budget.kind is None
    assert pool.isolation["run_budget"]["cgroup"] is None
    assert pool.isolation["run_budget"]["enforced_by"] == "per-process rlimits only"
    assert any(line.startswith("one memory and process budget per run: no usable cgroup")
               for line in pool.isolation["disabled"])
    assert pool.run(b"import os\nos.write(report_fd, b'1')", 5.0).report == b"1"


def test_invalid_budget_name_is_rejected():
  with pytest.raises(ValueError, match="'mopd-sandbox-x'"):
    sandbox_cgroups.CgroupBudget("mopd-sandbox-x", BUDGET, 8)


# ---------------------------------------------------------------- Broken workers.

GOOD = ("```python\ndef add3(x):\n    return x + 3\n```",
        {"fn_name": "add3", "inputs": [[1]], "outputs": [4]})
SLOW_GOOD = ("```python\nimport time\ndef add3(x):\n    time.sleep(1.5)\n    return x + 3\n```",
             {"fn_name": "add3", "inputs": [[1]], "outputs": [4]})


def _busy_worker(pool):
  """The worker running the slow response: the one whose run this loop has seen alive for
  0.7 s (the good responses' runs end well before; the slow one sleeps 1.5 s). Timed on
  this process's clock: psutil's create_time derives from the boot time in whole seconds
  and can make a fresh run look older than it is. Finished runs not yet reaped (zombies)
  do not count."""
  first_seen = {}
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline:
    now = time.monotonic()
    for pid in pool.worker_pids:
      try:
        runs = [r.pid for r in psutil.Process(pid).children()
                if r.status() != psutil.STATUS_ZOMBIE]
      except psutil.NoSuchProcess:
        continue
      for run in runs:
        if now - first_seen.setdefault((pid, run), now) > 0.7:
          return pid
    time.sleep(0.01)
  raise TimeoutError("no worker started the slow response")


def _batch_with_fault(pool, fault):
  """Scores [slow, good, good, good] while `fault` hits the slow response's worker."""
  responses, references = zip(SLOW_GOOD, GOOD, GOOD, GOOD)
  with concurrent.futures.ThreadPoolExecutor(1) as batch:
    future = batch.submit(code.score_batch_with_stats, list(responses), list(references),
                          max_workers=2, time_limit_s=2.0)
    victim = _busy_worker(pool)
    fault(victim)
    results, stats = future.result()
  return victim, results, stats


def _batch_time():
  start = time.monotonic()
  results = code.score_batch([GOOD[0]] * 4, [GOOD[1]] * 4, max_workers=2)
  assert [r.reward for r in results] == [1.0] * 4
  return time.monotonic() - start


@pytest.mark.parametrize("signum", [signal.SIGSEGV, signal.SIGKILL], ids=["crash", "killed"])
def test_worker_crash_costs_only_its_response(signum):
  pool = code.default_pool(2)  # the process-wide pool: earlier tests may have grown it
  baseline = _batch_time()
  workers = len(pool.worker_pids)

  victim, results, stats = _batch_with_fault(pool, lambda pid: os.kill(pid, signum))
  assert results[0].reward == 0.0 and results[0].status == "error", results[0]
  assert str(victim) in results[0].feedback
  assert [r.reward for r in results[1:]] == [1.0] * 3
  assert stats["verify/errors"] == 1.0 and stats["verify/timeouts"] == 0.0
  assert victim not in pool.worker_pids and len(pool.worker_pids) == workers  # Replaced.
  assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == "zombie"
  assert _batch_time() < 3 * baseline + 0.5  # The next batches run at full speed.


@pytest.mark.slow
def test_hung_worker_is_replaced(monkeypatch):
  """A worker stopped with SIGSTOP: its response fails after the reply grace (2 s here,
  10 s in a run: the wait is all this test would spend), then recovery."""
  monkeypatch.setattr(sandbox, "_REPLY_GRACE_S", 2.0)
  pool = code.default_pool(2)
  baseline = _batch_time()
  victim, results, stats = _batch_with_fault(pool, lambda pid: os.kill(pid, signal.SIGSTOP))
  assert results[0].status == "error" and "TimeoutError" in results[0].feedback, results[0]
  assert [r.reward for r in results[1:]] == [1.0] * 3
  assert stats["verify/errors"] == 1.0
  assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == "zombie"
  assert _batch_time() < 3 * baseline + 0.5


# ---------------------------------------------------------------- Clean starts.

KILLED_POOL = """
import sys, time
from mopd_jax.verifiers import sandbox
pool = sandbox.SandboxPool("def run(payload, report_fd):\\n  exec(payload.decode())\\n",
                           num_workers=1)
print(pool.base_dir, *pool.worker_pids, flush=True)
pool.run(b"import time\\ntime.sleep(60)", 60.0)
"""


def test_start_removes_what_a_killed_pool_left():
  proc = subprocess.Popen([sys.executable, "-c", KILLED_POOL], cwd=ROOT, stdout=subprocess.PIPE,
                          text=True)
  base_dir, worker = proc.stdout.readline().split()
  worker = int(worker)
  time.sleep(0.5)  # The run is sleeping in the worker.
  groups = [os.path.join(parent, os.path.basename(base_dir))
            for parent in sandbox_cgroups.own_cgroup_dirs().values()]
  groups = [group for group in groups if os.path.isdir(group)]
  proc.kill()
  proc.wait()
  assert os.path.isdir(base_dir) and psutil.pid_exists(worker)  # What it left behind.

  mine = tempfile.mkdtemp(prefix=f"mopd-sandbox-{sandbox_cgroups.owner_tag()}-")  # Alive.
  foreign = tempfile.mkdtemp(prefix="mopd-sandbox-")  # Not ours to judge: no owner tag.
  try:
    with sandbox.SandboxPool(EXEC_HARNESS, num_workers=1) as pool:
      assert not os.path.exists(base_dir)
      assert not psutil.pid_exists(worker) or psutil.Process(worker).status() == "zombie"
      assert not any(os.path.exists(group) for group in groups)
      assert os.path.isdir(mine) and os.path.isdir(foreign)
      assert pool.run(b"import os\nos.write(report_fd, b'1')", 5.0).report == b"1"
  finally:
    os.rmdir(mine)
    os.rmdir(foreign)


def test_code_verifier_reports_a_memory_budget_stop_as_such(monkeypatch):
  """A run stopped at the budget scores 0 as a timeout, with the budget as its reason."""

  class BudgetStoppedPool:
    def run(self, payload, budget_s, deadline=None):
      del payload, budget_s, deadline
      return sandbox.SandboxRun(report=b"", timed_out=True, exit_code=-9, wall_s=0.4,
                                cpu_s=0.3, stopped_by="memory_budget")

  monkeypatch.setattr(code, "default_pool", lambda *args: BudgetStoppedPool())
  reference = {"inputs": [[1]], "outputs": [1], "fn_name": "f"}
  result = code.score("```python\ndef f(x):\n  return x\n```", reference)
  assert (result.reward, result.status) == (0.0, "timeout")
  assert "memory budget" in result.feedback and "Time limit" not in result.feedback
