r"""Reliability of the verifier sandbox and the checkpoints under injected faults.

    python -m benchmarks.reliability                       # every fault, 300 load batches
    python -m benchmarks.reliability --repeats=1 --batches=20   # a quick pass

Injects each fault several times and checks what survived and what was lost:
- memory attack: two responses at once, each forking as many children as its process cap
  allows, each child filling 850 MiB (the per-run cgroup budget must stop each tree);
- a sandbox worker that crashes (SIGSEGV), is killed (SIGKILL) or hangs (SIGSTOP) while it
  verifies a response of a batch of four;
- a verifier process killed with SIGKILL while its pool runs (the next start cleans up);
- SIGKILL during an asynchronous checkpoint save (at orbax's commit points and at random
  moments), a truncated or corrupted latest checkpoint, a full disk at save time (a small
  tmpfs);
- load: the adversarial suite's hostile programs mixed with valid responses, batch after
  batch, watching processes, open files and resident memory for leaks.
"Data lost" counts valid responses scored wrong, or resumed states that differ from an
uninterrupted run; it must be 0. Prints the results as JSON and, with --write, replaces
the reliability section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np
import psutil

from mopd_jax.verifiers import code, sandbox, sandbox_cgroups
from tests import test_checkpoint_faults as ckpt_faults
from tests import test_sandbox_adversarial as adversarial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "RESULTS.md")
SECTION = "## Reliability under faults (`python -m benchmarks.reliability`)"
GOOD = ("```python\ndef add3(x):\n    return x + 3\n```",
        {"fn_name": "add3", "inputs": [[1]], "outputs": [4]})
SLOW_GOOD = ("```python\nimport time\ndef add3(x):\n    time.sleep(1.5)\n    return x + 3\n```",
             GOOD[1])
MEMORY_ATTACK = ("""```python
import os, time
def f(x):
    while True:
        try:
            if os.fork() == 0:
                block = bytearray(850 << 20)
                for i in range(0, len(block), 4096):
                    block[i] = 1
                time.sleep(60)
                os._exit(0)
        except OSError:
            break
    time.sleep(60)
```""", {"fn_name": "f", "inputs": [[1]], "outputs": [1]})


class MemoryWatch:
  """While in use, samples the host's available memory and the summed resident memory of
  the processes of `uids` (the sandbox's runs)."""

  def __init__(self, uids):
    self.uids = set(uids)

  def __enter__(self):
    self.before = self.lowest = psutil.virtual_memory().available
    self.peak_rss = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample)
    self._thread.start()
    return self

  def _sample(self):
    while not self._stop.is_set():
      self.lowest = min(self.lowest, psutil.virtual_memory().available)
      rss = 0
      for process in psutil.process_iter(["uids", "memory_info"]):
        if process.info["uids"] and process.info["uids"].real in self.uids:
          rss += process.info["memory_info"].rss if process.info["memory_info"] else 0
      self.peak_rss = max(self.peak_rss, rss)
      time.sleep(0.01)

  def __exit__(self, *exc_info):
    self._stop.set()
    self._thread.join()


def _row(fault, injected, survived, affected, lost, note=""):
  return {"fault": fault, "injected": injected, "survived": survived, "affected": affected,
          "lost": lost, "note": note}


def _lost(results, valid):
  """Valid responses (by index) that were not scored 1.0."""
  return sum(results[i].reward != 1.0 for i in valid)


def memory_attack(repeats):
  pool = code.default_pool(2)
  survived = lost = 0
  lowest, drops, peaks = [], [], []
  for _ in range(repeats):
    with MemoryWatch(pool.uids) as memory:
      results, _ = code.score_batch_with_stats(
          [MEMORY_ATTACK[0]] * 2 + [GOOD[0]] * 2, [MEMORY_ATTACK[1]] * 2 + [GOOD[1]] * 2,
          max_workers=2, time_limit_s=10.0)
    lowest.append(memory.lowest)
    drops.append(memory.before - memory.lowest)
    peaks.append(memory.peak_rss)
    stopped = all(r.reward == 0.0 and r.status in ("timeout", "error") for r in results[:2])
    lost += _lost(results, [2, 3])
    survived += stopped and not _left_in_cgroups(pool)
  total = psutil.virtual_memory().total
  return _row("memory: 2 responses x (6 children x 850 MiB)", repeats, survived, 2 * repeats,
              lost, f"cgroup {pool.budget.kind}; the attacking processes held at most "
              f"{max(peaks) / 2**30:.2f} GiB together; host memory available fell by at most "
              f"{max(drops) / 2**30:.2f} GiB, to {min(lowest) / 2**30:.1f} of "
              f"{total / 2**30:.0f} GiB"), (min(lowest), max(drops), max(peaks))


def _left_in_cgroups(pool):
  """Processes still in the slots' cgroups (none once every run ended)."""
  groups = pool.budget.describe().get("groups", [])
  return [pid for group in groups for slot in os.scandir(group) if slot.is_dir()
          for pid in sandbox_cgroups.members(slot.path)]


FORK_FILL = b"""
import os, time
read_end, write_end = os.pipe()
children = 0
for _ in range(50):
  try:
    child = os.fork()
  except OSError:
    break
  if child == 0:
    try:
      block = bytearray(850 << 20)
      for i in range(0, len(block), 4096):
        block[i] = 1
      os.write(write_end, b"f")
      time.sleep(60)
    finally:
      os._exit(0)
  children += 1
filled = 0
while filled < children:
  filled += len(os.read(read_end, children))
os.write(report_fd, str(filled).encode())
"""


def memory_without_budget():
  """(fall of available memory, children that filled 850 MiB, peak resident memory of the
  run's processes) of one fork-and-fill run with the per-process limits only."""
  own_cgroup_dirs = sandbox_cgroups.own_cgroup_dirs
  sandbox_cgroups.own_cgroup_dirs = dict  # No cgroup found: the pool falls back.
  try:
    with sandbox.SandboxPool(adversarial.EXEC_HARNESS, num_workers=1) as pool:
      if pool.budget.kind is not None:
        raise RuntimeError("the pool without cgroups has one")
      with MemoryWatch(pool.uids) as memory:
        run = pool.run(FORK_FILL, 120.0)  # Ends once every child has filled its block.
  finally:
    sandbox_cgroups.own_cgroup_dirs = own_cgroup_dirs
  return memory.before - memory.lowest, int(run.report or 0), memory.peak_rss


def _busy_worker(pool):
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline:
    for pid in pool.worker_pids:
      try:
        if any(time.time() - run.create_time() > 0.4 for run in psutil.Process(pid).children()):
          return pid
      except psutil.NoSuchProcess:
        continue
    time.sleep(0.01)
  raise TimeoutError("no worker started the slow response")


def worker_fault(name, signum, repeats):
  pool = code.default_pool(2)
  baseline = _batch_seconds()
  survived = lost = affected = 0
  after = []
  for _ in range(repeats):
    responses, references = zip(SLOW_GOOD, GOOD, GOOD, GOOD)
    with concurrent.futures.ThreadPoolExecutor(1) as batch:
      future = batch.submit(code.score_batch_with_stats, list(responses), list(references),
                            max_workers=2, time_limit_s=2.0)
      victim = _busy_worker(pool)
      os.kill(victim, signum)
      results, stats = future.result()
    affected += sum(r.status == "error" for r in results)
    lost += _lost(results, [1, 2, 3])
    after += [_batch_seconds() for _ in range(3)]
    survived += (results[0].status == "error" and stats["verify/errors"] == 1.0
                 and victim not in pool.worker_pids)
  return _row(f"sandbox worker {name} mid-batch", repeats, survived, affected, lost,
              f"next 3 batches of 4: median {np.median(after):.2f} s, slowest "
              f"{max(after):.2f} s (before the fault: {baseline:.2f} s)")


def _batch_seconds():
  start = time.monotonic()
  results = code.score_batch([GOOD[0]] * 4, [GOOD[1]] * 4, max_workers=2)
  if any(r.reward != 1.0 for r in results):
    raise RuntimeError(f"a valid response failed: {results}")
  return time.monotonic() - start


KILLED_POOL = """
from mopd_jax.verifiers import sandbox
pool = sandbox.SandboxPool("def run(payload, report_fd):\\n  exec(payload.decode())\\n",
                           num_workers=2)
print(pool.base_dir, *pool.worker_pids, flush=True)
pool.run(b"import time\\ntime.sleep(60)", 60.0)
"""


def killed_verifier(repeats):
  survived = 0
  for _ in range(repeats):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_POOL], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    base_dir, *workers = proc.stdout.readline().split()
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    left = os.path.isdir(base_dir) and any(psutil.pid_exists(int(w)) for w in workers)
    with sandbox.SandboxPool(adversarial.EXEC_HARNESS, num_workers=1):
      clean = not os.path.exists(base_dir) and not any(
          psutil.pid_exists(int(w)) and psutil.Process(int(w)).status() != "zombie"
          for w in workers)
    survived += left and clean
  return _row("verifier killed (SIGKILL) with its pool running", repeats, survived, 0, 0,
              "stale directory, cgroups and workers removed at the next start")


def checkpoint_kills(repeats, scratch):
  reference = os.path.join(scratch, "reference")
  if ckpt_faults._loop(reference + "/ckpt", reference + "/final.npy").returncode != 0:
    raise RuntimeError("the uninterrupted checkpoint loop failed")
  want = np.load(reference + "/final.npy")
  injected = survived = lost = 0
  plans = [(point, 0.0) for point in ("before_commit", "after_commit")]
  plans += [("", random.Random(seed).uniform(0.0, 0.15)) for seed in range(repeats)]
  for attempt, (point, delay) in enumerate(plans):
    directory = os.path.join(scratch, f"kill{attempt}")
    out = directory + "/final.npy"
    proc = subprocess.Popen([sys.executable, "-c", ckpt_faults.LOOP, directory + "/ckpt", out,
                             point], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    if not point:
      while not any(n.startswith("3") for n in ckpt_faults._listdir(directory + "/ckpt")):
        time.sleep(0.002)
      time.sleep(delay)
      proc.kill()
    killed = proc.wait() == -signal.SIGKILL
    injected += 1
    resumed = ckpt_faults._loop(directory + "/ckpt", out)
    same = resumed.returncode == 0 and np.array_equal(np.load(out), want)
    survived += killed and same
    lost += not same
  return _row("SIGKILL during an asynchronous checkpoint save", injected, survived, 0, lost,
              "2 at orbax's commit points, the rest at random moments; resumed "
              "state bit-identical to an uninterrupted run")


def damaged_checkpoints(repeats, scratch):
  injected = survived = lost = 0
  abstract = ckpt_faults.ABSTRACT
  for attempt in range(repeats):
    for damage in ("truncate", "flip_byte"):
      ckpt = ckpt_faults._saved(os.path.join(scratch, f"damaged{attempt}{damage}"), [1, 2, 3])
      victim = ckpt_faults._largest_file(ckpt.step_dir(3))
      if damage == "truncate":
        os.truncate(victim, os.path.getsize(victim) // 2)
      else:
        with open(victim, "r+b") as f:
          f.seek(os.path.getsize(victim) // 2)
          byte = f.read(1)
          f.seek(-1, os.SEEK_CUR)
          f.write(bytes([byte[0] ^ 1]))
      injected += 1
      step, state, _ = ckpt.restore_latest(abstract)
      intact = np.array_equal(state["w"], ckpt_faults._state(2)["w"])
      survived += step == 2 and intact
      lost += not intact
      ckpt.close()
  return _row("truncated / corrupted latest checkpoint", injected, survived, 0, lost,
              "truncation fails the restore, a flipped bit restores other values than "
              "the state's fingerprint; moved aside, resumed from the previous step")


def full_disk(repeats, scratch):
  injected = survived = lost = 0
  for attempt in range(repeats):
    mount = os.path.join(scratch, f"small{attempt}")
    os.makedirs(mount)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", mount],
                      check=False, capture_output=True).returncode != 0:
      return _row("full disk at save time", 0, 0, 0, 0, "skipped: cannot mount a tmpfs")
    try:
      ckpt = ckpt_faults._saved(os.path.join(mount, "ckpt"), [1, 2])
      injected += 1
      failed = not (ckpt.save(3, ckpt_faults._state(3), {"data_position": 3})
                    and ckpt.wait())
      intact = all(np.array_equal(ckpt.restore(s, ckpt_faults.ABSTRACT)[0]["w"],
                                  ckpt_faults._state(s)["w"]) for s in (1, 2))
      step, state, _ = ckpt.restore_latest(ckpt_faults.ABSTRACT)
      intact = intact and step == 2 and np.array_equal(state["w"], ckpt_faults._state(2)["w"])
      survived += failed and intact and ckpt.all_steps() == [1, 2]
      lost += not intact
      ckpt.close()
    finally:
      subprocess.run(["umount", "-l", mount], check=False)
  return _row("full disk at save time (2.5 MiB tmpfs)", injected, survived, 0, lost,
              "save reported as failed, partial files removed, earlier steps intact")


def _footprint(pool):
  """(processes, open fds, RSS bytes) of this process, its workers and their runs."""
  me = psutil.Process()
  processes = [me] + me.children(recursive=True)
  uids = set(pool.uids)
  processes += [p for p in psutil.process_iter(["uids"])
                if p.info["uids"] and p.info["uids"].real in uids]
  rss = 0
  for process in processes:
    try:
      rss += process.memory_info().rss
    except psutil.NoSuchProcess:
      continue
  return len(processes), me.num_fds(), rss


def load(batches, hostile_per_batch):
  """Hostile programs mixed with valid responses; returns the load-run numbers."""
  host = adversarial.Host()
  attacks = [(name, ref, adversarial.fenced(host.substitute(program)))
             for name, ref, program, _ in adversarial.ATTACKS]
  pool = code.default_pool(2)
  wrong = hostile = valid = 0
  samples = []
  start = time.monotonic()
  try:
    for batch in range(batches):
      picks = [attacks[(batch * hostile_per_batch + i) % len(attacks)]
               for i in range(hostile_per_batch)]
      responses = [p[2] for p in picks] + [GOOD[0]] * (4 - hostile_per_batch)
      references = [p[1] for p in picks] + [GOOD[1]] * (4 - hostile_per_batch)
      results, _ = code.score_batch_with_stats(responses, references, max_workers=2,
                                               time_limit_s=adversarial.LIMIT_S)
      wrong += sum(r.reward != 0.0 for r in results[:hostile_per_batch])
      wrong += _lost(results, range(hostile_per_batch, 4))
      hostile += hostile_per_batch
      valid += 4 - hostile_per_batch
      if batch == min(10, batches - 1) or batch == batches - 1:
        samples.append(_footprint(pool))
    intact = host.intact() and not host.connections
  finally:
    host.close()
  (p0, f0, r0), (p1, f1, r1) = samples[0], samples[-1]
  return {"batches": batches, "hostile": hostile, "valid": valid, "wrong_verdicts": wrong,
          "host_intact": intact, "wall_s": round(time.monotonic() - start, 1),
          "processes": [p0, p1], "fds": [f0, f1], "rss_mib": [r0 >> 20, r1 >> 20]}


def table(rows, load_run, headroom):
  """The Markdown section. headroom: with the budget, (lowest available bytes, largest fall,
  peak resident memory of the attacking runs); without it, (fall, children that filled
  their block, peak resident memory of the run)."""
  lines = [SECTION, "",
           f"On {platform.machine()}, {psutil.cpu_count()} cores, "
           f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Linux {platform.release()}, "
           f"as root; verifier pool of 2 workers, 1 GiB memory budget per response.", "",
           "| fault | injected | survived | responses affected (scored 0) | data lost | notes |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['fault']} | {r['injected']} | {r['survived']} | {r['affected']} | "
                 f"{r['lost']} | {r['note']} |")
  lr = load_run
  lines += ["", f"Load: {lr['batches']} batches of 4 ({lr['hostile']} hostile programs from the "
            f"adversarial suite, {lr['valid']} valid responses) in {lr['wall_s']} s; wrong "
            f"verdicts {lr['wrong_verdicts']}, host canaries intact: {lr['host_intact']}.", "",
            "| quantity | after 10 batches | at the end |", "|---|---|---|",
            f"| processes (verifier, workers, runs) | {lr['processes'][0]} | "
            f"{lr['processes'][1]} |",
            f"| open file descriptors of the verifier | {lr['fds'][0]} | {lr['fds'][1]} |",
            f"| resident memory (verifier + workers) | {lr['rss_mib'][0]} MiB | "
            f"{lr['rss_mib'][1]} MiB |",
            "", f"Host memory headroom during the worst attack (two memory attacks at once, "
            f"each capped at 1 GiB): the attacking processes held at most "
            f"{headroom[2] / 2**30:.2f} GiB together (summed resident memory of the sandbox "
            f"uids, which counts the pages forked processes share once per process), "
            f"the host's available memory fell by at most {headroom[1] / 2**30:.2f} GiB and "
            f"stayed at or above {headroom[0] / 2**30:.1f} GiB of "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB (other programs share this "
            f"host, so the fall is approximate). For comparison, one run of the same "
            f"fork-and-fill program with the per-process limits only (no cgroup): "
            f"{headroom[4]} children filled 850 MiB each, holding {headroom[5] / 2**30:.2f} GiB "
            f"(available memory fell by {headroom[3] / 2**30:.2f} GiB).", ""]
  return "\n".join(lines)


def write_section(text):
  with open(RESULTS, encoding="utf-8") as f:
    content = f.read()
  pattern = re.compile(re.escape(SECTION) + r".*?(?=\n## |\Z)", re.S)
  content = (pattern.sub(lambda _: text.rstrip("\n"), content) if pattern.search(content)
             else content.rstrip("\n") + "\n\n" + text)
  with open(RESULTS, "w", encoding="utf-8") as f:
    f.write(content.rstrip("\n") + "\n")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=5, help="injections of each fault")
  parser.add_argument("--batches", type=int, default=300, help="batches of the load run")
  parser.add_argument("--hostile_per_batch", type=int, default=2)
  parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
  args = parser.parse_args()
  jax.config.update("jax_platforms", "cpu")
  scratch = tempfile.mkdtemp(prefix="mopd-reliability-")
  try:
    memory_row, headroom = memory_attack(max(1, args.repeats // 2))
    headroom += memory_without_budget()
    rows = [memory_row,
            worker_fault("crash (SIGSEGV)", signal.SIGSEGV, args.repeats),
            worker_fault("killed (SIGKILL)", signal.SIGKILL, args.repeats),
            worker_fault("hang (SIGSTOP)", signal.SIGSTOP, max(1, args.repeats // 2)),
            killed_verifier(max(1, args.repeats // 2)),
            checkpoint_kills(args.repeats, scratch),
            damaged_checkpoints(args.repeats, scratch),
            full_disk(max(1, args.repeats // 2), scratch)]
    load_run = load(args.batches, args.hostile_per_batch)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  print(json.dumps({"faults": rows, "load": load_run, "headroom": headroom}, indent=1))
  text = table(rows, load_run, headroom)
  print(text)
  if args.write:
    write_section(text)


if __name__ == "__main__":
  main()
