"""A sandbox for untrusted Python programs: a persistent pool of fork-server workers.

Each pool slot is a worker process (`python -I -S -B -X utf8 sandbox_worker.py`, empty
environment) that loads a harness once and then, per task, forks a fresh run. A run can
read the task payload and write one report to fd 3; the caller gets back that report
(bounded), whether the wall-clock limit was hit, the exit code and the run's CPU time.
The layers, as far as the platform allows (probed when a worker starts and reported by
`SandboxPool.isolation`, logged once per pool):

- Credentials (verifier is root): every slot owns a dedicated, otherwise unused uid/gid
  (claimed with a host-wide lock file); a run executes under it with no supplementary
  groups and no_new_privs, so it cannot read root-only or other users' files, and
  "kill every process of this uid" (`kill(-1, SIGKILL)` from a helper running as that
  uid) is a complete and safe cleanup, even for processes that left the process group
  with setsid().
- Namespaces (root): the worker sits in a private network namespace (only a loopback
  that is down: nothing can be reached) and a private mount namespace. Each run gets new
  mount, PID and IPC namespaces, is chrooted into a minimal read-only root (/usr and the
  /bin, /lib* links, the Python installation, /dev/{null,zero,random,urandom}) with its
  own /proc and a fresh size-capped tmpfs as /tmp, which is its working directory, HOME
  and TMPDIR and vanishes with the run. The run is PID 1 of its namespace, so when it
  exits the kernel kills everything it started.
- Without root: the same namespaces and private root come from a user namespace (where
  the kernel allows unprivileged ones); runs keep the verifier's uid but lose every
  capability. The worker is a child subreaper, so processes that escaped a run are
  re-parented to it and killed; the process limit counts the user's existing tasks.
- Without namespaces: runs see the host filesystem and network. A per-run directory is
  their cwd and is removed afterwards; as root, the files of the slot uid in /tmp,
  /var/tmp and /dev/shm are removed too (without root, files a run writes elsewhere stay).
- One budget per run (root, cgroup v2 or v1, see sandbox_cgroups.py): all processes of a
  run share a memory cap (`Limits.memory_bytes`, no swap) and a task cap
  (`Limits.max_processes`); a process tree that reaches the memory cap is stopped as a whole
  (`SandboxRun.stopped_by == "memory_budget"`). Without a usable cgroup the isolation report
  says why, and the per-process limits below remain.
- Always: a process group per run, rlimits (CPU time, address space, processes, file
  size, open files, no core dumps), a wall-clock limit, an environment of only HOME,
  TMPDIR, PATH and LANG, /dev/null as stdin/stdout/stderr and every other fd closed.

Clean starts: a pool's directory and cgroups are named `mopd-sandbox-<pid namespace>-<pid>-
<start time>-*` after the process that owns the pool. A new pool removes those whose owner
is gone (a run killed with SIGKILL), together with their workers and the processes of their
uids.

This module is the pool: the workers' lifecycle, their uids, deadlines and recycling. The
workers (the isolation itself) are in sandbox_worker.py; the types, the protocol between
pool and workers and the helpers both use are in sandbox_kernel.py.
Requires Linux >= 5.3 (pidfd).
"""

from __future__ import annotations

import dataclasses
import fcntl
import grp
import json
import logging
import os
import pwd
import queue
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time

from mopd_jax.verifiers import sandbox_cgroups, sandbox_worker

# Limits, SandboxError and SandboxRun are defined with what the standalone worker shares
# with the pool, and are part of this module's interface.
from mopd_jax.verifiers.sandbox_kernel import (
    _PATH,
    _REPLY,
    _TASK,
    STOPPED_BY,
    Limits,
    SandboxError,
    SandboxRun,
    _kill_until_gone,
    _pids_of_uid,
    _process_table,
    _read_frame,
    _remove_tree,
    _write_frame,
)

__all__ = ["Limits", "SandboxError", "SandboxPool", "SandboxRun"]

_WORKER_START_S = 60.0
_REPLY_GRACE_S = 10.0
_LOCK_DIR = "/run/lock" if os.path.isdir("/run/lock") else tempfile.gettempdir()
_UIDS_FILE = "uids"  # In a pool's directory: the uids it claimed, one per line.


def _is_known_id(uid: int) -> bool:
  """Whether an account or a group has this id."""
  for lookup in (pwd.getpwuid, grp.getgrgid):
    try:
      lookup(uid)
      return True
    except KeyError:
      continue
  return False


def _lock_uid(uid: int) -> int | None:
  """The lock fd of sandbox uid `uid` if no live pool holds it, else None."""
  lock = os.open(
      os.path.join(_LOCK_DIR, f"mopd-sandbox-uid-{uid}.lock"), os.O_RDWR | os.O_CREAT, 0o600
  )
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(lock)
    return None
  _kill_until_gone(lambda: _pids_of_uid(uid))  # Left by a pool that crashed.
  return lock


def _claim_uid(first_uid: int) -> tuple[int, int]:
  """(uid, lock fd) of the first uid >= first_uid that no account, group or pool uses."""
  for uid in range(first_uid, first_uid + 10_000):
    if not _is_known_id(uid) and (lock := _lock_uid(uid)) is not None:
      return uid, lock
  raise SandboxError(f"No free sandbox uid in [{first_uid}, {first_uid + 10_000}).")


def _processes_with_argument(argument: str) -> list[int]:
  """Processes that have `argument` as one of their command-line arguments."""
  found = []
  for pid in _process_table():
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if argument.encode() in f.read().split(b"\0"):
          found.append(pid)
    except OSError:
      continue
  return found


def remove_stale_pools(temp_dir: str | None = None) -> list[str]:
  """Removes what pools of dead processes left behind; returns the directories removed.

  A pool's directory is `mopd-sandbox-<owner tag>-*` in `temp_dir` (default: the temp
  folder); it is stale when its owner's PID namespace is this one and no process has the
  owner's pid and start time (`sandbox_cgroups.stale_owner`). Then
  its workers (which carry the directory as their argument), the processes of the uids it
  claimed (once no live pool holds their lock) and the directory are removed, and so are
  the cgroups of dead pools (`sandbox_cgroups.remove_stale`). Directories of other users
  and of live pools are left alone.
  """
  temp_dir = temp_dir or tempfile.gettempdir()
  removed = []
  for entry in os.scandir(temp_dir):
    try:
      if (not sandbox_cgroups.stale_owner(entry.name)
          or not entry.is_dir(follow_symlinks=False)
          or entry.stat(follow_symlinks=False).st_uid != os.geteuid()):
        continue
      _kill_until_gone(lambda path=entry.path: _processes_with_argument(path))
      uids = []
      if os.path.exists(os.path.join(entry.path, _UIDS_FILE)):
        with open(os.path.join(entry.path, _UIDS_FILE), encoding="ascii") as f:
          uids = [int(line) for line in f if line.strip()]
      for uid in uids if os.geteuid() == 0 else []:
        if (lock := _lock_uid(uid)) is not None:
          os.close(lock)
      _remove_tree(entry.path)
      removed.append(entry.path)
    except (OSError, ValueError) as exc:
      logging.warning("Could not remove the stale sandbox directory %s: %s", entry.path, exc)
  stale_groups = sandbox_cgroups.remove_stale()
  if removed or stale_groups:
    logging.info("Removed what earlier sandbox pools left behind: %s", removed + stale_groups)
  return removed


class _Slot:
  """A worker process and the uid its runs use; used by one thread at a time."""

  def __init__(self, pool: SandboxPool, index: int, uid: int | None):
    self.pool, self.index, self.uid = pool, index, uid
    self.proc: subprocess.Popen | None = None
    self.tasks = 0

  def start(self) -> dict:
    config = {
        "harness": self.pool.harness_source,
        "limits": dataclasses.asdict(self.pool.limits),
        "uid": self.uid,
        "gid": self.uid,
        "base_dir": self.pool.base_dir,
        "namespaces": self.pool.namespaces,
        "cgroup": self.pool.budget.slot_config(self.index),
    }
    # The pool directory as an argument (unused by the worker) marks it as this pool's.
    self.proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-B", "-X", "utf8", os.path.abspath(sandbox_worker.__file__),
         self.pool.base_dir],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={"PATH": _PATH},
        cwd="/",
        start_new_session=True,
    )
    self.tasks = 0
    try:
      _write_frame(self.proc.stdin.fileno(), json.dumps(config).encode("utf-8"))
      deadline = time.monotonic() + _WORKER_START_S
      return json.loads(_read_frame(self.proc.stdout.fileno(), deadline))
    except (OSError, EOFError, TimeoutError, ValueError) as exc:
      self.stop()
      raise SandboxError(f"The sandbox worker failed to start: {exc}") from exc

  def run(self, payload: bytes, timeout_s: float) -> SandboxRun:
    if self.proc is None:
      self.start()
    try:
      _write_frame(self.proc.stdin.fileno(), _TASK.pack(timeout_s, len(payload)) + payload)
      reply = _read_frame(self.proc.stdout.fileno(), time.monotonic() + timeout_s + _REPLY_GRACE_S)
      timed_out, stop_code, exit_code, wall_s, cpu_s, size = _REPLY.unpack_from(reply)
    except (OSError, EOFError, TimeoutError, struct.error) as exc:
      pid = self.proc.pid
      self.stop()
      try:  # Replaced now, so that the next task does not wait for a start.
        self.start()
      except SandboxError:
        pass  # Retried by the next task of this slot.
      raise SandboxError(f"Sandbox worker {pid} failed: {type(exc).__name__}: {exc}") from exc
    self.tasks += 1
    if self.tasks >= self.pool.tasks_per_worker:
      self.stop()
    report = reply[_REPLY.size : _REPLY.size + size]
    return SandboxRun(report, timed_out, exit_code, wall_s, cpu_s, STOPPED_BY[stop_code])

  def stop(self) -> None:
    """Ends the worker and anything its runs left behind."""
    if self.proc is None:
      return
    proc, self.proc = self.proc, None
    proc.stdin.close()
    try:
      proc.wait(timeout=2.0)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    proc.stdout.close()
    self.pool.budget.kill_slot(self.index)
    if self.uid is not None:
      _kill_until_gone(lambda: _pids_of_uid(self.uid))


class SandboxPool:
  """A fixed set of fork-server workers that run untrusted code under `harness_source`.

  `harness_source` is Python source, executed once per worker, that defines
  `run(payload: bytes, report_fd: int) -> None`; every task calls it in a fresh sandboxed
  process. `run` is thread-safe: concurrent calls use different workers.

  Args:
    harness_source: the harness (stdlib only; the worker runs with `-I -S`).
    num_workers: worker processes; defaults to os.cpu_count().
    limits: per-run resource limits.
    tasks_per_worker: a worker is replaced after this many tasks (and after any failure).
    first_uid: the dedicated sandbox uids are claimed upward from here (root only).
    namespaces: use Linux namespaces where the platform allows (False keeps only the
      credential, rlimit and process-group layers).
  """

  def __init__(
      self,
      harness_source: str,
      *,
      num_workers: int | None = None,
      limits: Limits = Limits(),
      tasks_per_worker: int = 1000,
      first_uid: int = 59000,
      namespaces: bool = True,
  ):
    num_workers = num_workers or os.cpu_count() or 1
    if not isinstance(num_workers, int) or num_workers < 1:
      raise ValueError(f"num_workers must be a positive int, got {num_workers!r}.")
    if not isinstance(tasks_per_worker, int) or tasks_per_worker < 1:
      raise ValueError(f"tasks_per_worker must be a positive int, got {tasks_per_worker!r}.")
    self.harness_source, self.limits = harness_source, limits
    self.tasks_per_worker, self.first_uid = tasks_per_worker, first_uid
    self.namespaces = namespaces
    remove_stale_pools()
    self.base_dir = tempfile.mkdtemp(prefix=f"mopd-sandbox-{sandbox_cgroups.owner_tag()}-")
    self.budget = sandbox_cgroups.CgroupBudget(
        os.path.basename(self.base_dir), limits.memory_bytes, limits.max_processes)
    os.makedirs(os.path.join(self.base_dir, "root"))
    os.makedirs(os.path.join(self.base_dir, "runs"))
    for path in (self.base_dir, os.path.join(self.base_dir, "runs")):
      os.chmod(path, 0o711)
    self._lock = threading.Lock()
    self._slots: list[_Slot] = []
    self._locks: list[int] = []
    self._idle: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
    self.isolation: dict = {}
    try:
      self.ensure_workers(num_workers)
    except BaseException:
      self.close()
      raise
    self.isolation["run_budget"] = {"enforced_by": self.isolation["run_budget"],
                                    **self.budget.describe()}
    if self.budget.kind is None:
      self.isolation["disabled"].append(
          f"one memory and process budget per run: {self.budget.reason}; the per-process "
          f"rlimits remain (address space {limits.memory_bytes} bytes, "
          f"{limits.max_processes} processes)")
    logging.info(
        "Sandbox pool: %d workers, isolation %s",
        num_workers,
        json.dumps({k: v for k, v in self.isolation.items() if k != "probe"}),
    )

  @property
  def num_workers(self) -> int:
    return len(self._slots)

  @property
  def uids(self) -> list[int]:
    """The dedicated uids of the workers' runs (empty when the verifier is not root)."""
    return [slot.uid for slot in self._slots if slot.uid is not None]

  @property
  def worker_pids(self) -> list[int]:
    """Process ids of the running workers."""
    return [slot.proc.pid for slot in self._slots if slot.proc is not None]

  def ensure_workers(self, num_workers: int) -> None:
    """Grows the pool to at least `num_workers` started workers."""
    with self._lock:
      while len(self._slots) < num_workers:
        uid = None
        if os.geteuid() == 0:
          uid, lock = _claim_uid(max([self.first_uid] + [s.uid + 1 for s in self._slots]))
          self._locks.append(lock)
          with open(os.path.join(self.base_dir, _UIDS_FILE), "a", encoding="ascii") as f:
            f.write(f"{uid}\n")
        slot = _Slot(self, len(self._slots), uid)
        report = slot.start()
        self._slots.append(slot)
        self.isolation = self.isolation or report
        self._idle.put(slot)

  def set_limits(self, limits: Limits) -> None:
    """Applies `limits` to every run from now on: waits for the runs in flight, then
    restarts the workers with them."""
    if not isinstance(limits, Limits):
      raise TypeError(f"limits must be a sandbox.Limits, got {limits!r}.")
    with self._lock:
      if limits == self.limits:
        return
      slots = [self._idle.get() for _ in self._slots]
      try:
        self.limits = limits
        self.budget.set_limits(limits.memory_bytes, limits.max_processes)
        for slot in slots:
          slot.stop()
          slot.start()
      finally:
        for slot in slots:
          self._idle.put(slot)
      self.isolation["limits"] = dataclasses.asdict(limits)
      self.isolation["run_budget"].update(self.budget.describe())
    logging.info("Sandbox pool: limits now %s", json.dumps(self.isolation["limits"]))

  def run(self, payload: bytes, timeout_s: float, *, deadline: float | None = None) -> SandboxRun:
    """Runs the harness on `payload` in a fresh sandboxed process, killed after `timeout_s`.

    Args:
      payload: what the harness's `run` receives.
      timeout_s: wall-clock limit of the run.
      deadline: optional time.monotonic() value by which both the wait for a free worker
        and the run end (the run's limit is shortened to it).

    Raises:
      TimeoutError: the deadline passed before the run could start.
      SandboxError: the worker died or stopped answering (it is replaced).
    """
    if not self._slots:
      raise SandboxError("The sandbox pool is closed.")
    try:
      wait_s = None if deadline is None else max(0.0, deadline - time.monotonic())
      slot = self._idle.get(timeout=wait_s)
    except queue.Empty as exc:
      raise TimeoutError("No sandbox worker became free before the deadline.") from exc
    try:
      if deadline is not None:
        timeout_s = min(timeout_s, deadline - time.monotonic())
        if timeout_s <= 0:
          raise TimeoutError("The deadline passed before the run could start.")
      return slot.run(payload, timeout_s)
    finally:
      self._idle.put(slot)

  def close(self) -> None:
    """Stops every worker, kills what is left of their runs and frees the uids."""
    with self._lock:
      for slot in self._slots:
        slot.stop()
      self._slots = []
      self.budget.close()
      for lock in self._locks:
        os.close(lock)
      self._locks = []
      shutil.rmtree(self.base_dir, ignore_errors=True)

  def __enter__(self) -> SandboxPool:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
