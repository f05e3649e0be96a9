"""The worker side of the sandbox (see sandbox.py): a fork server that isolates every run.

`SandboxPool` starts each worker as a script (`python -I -S -B -X utf8 sandbox_worker.py`),
so this module imports only the standard library, and none of the modules whose at-fork
hooks slow down every fork (logging, queue, subprocess, threading). A worker enters its
namespaces and builds the private root once, confirms the isolation with a probe run, then
forks a run per task: new namespaces, the private root, dropped credentials and rlimits
around the harness, and afterwards the removal of whatever the run left behind.

Where the pool has a cgroup for the worker's slot (sandbox_cgroups.py), every run joins it
before it drops its privileges, so the run's whole process tree shares one memory and
process budget; a run that reaches the memory cap is stopped and reported as such.

The types, the protocol with its framing and the helpers that the pool shares with its
workers, and the probe run, are in sandbox_kernel.py (standard library only as well). Run
as a script, this module imports it from its own directory, which `-I` leaves off sys.path:
the directory is put there for that import only, so runs import what they did before.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import resource
import select
import signal
import sys
import tempfile
import time
from collections.abc import Callable

if __name__ == "__main__":  # Started as a script (`-I`): see the module docstring.
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import sandbox_kernel  # pylint: disable=import-error
  del sys.path[0]
  # The package import below then finds the module just loaded from this directory
  # (a name already in sys.modules needs no parent package).
  sys.modules["mopd_jax.verifiers.sandbox_kernel"] = sandbox_kernel

from mopd_jax.verifiers.sandbox_kernel import (  # noqa: E402
    _CLONE_NEWIPC, _CLONE_NEWNET, _CLONE_NEWNS, _CLONE_NEWPID, _CLONE_NEWUSER, _MS_BIND,
    _MS_NODEV, _MS_NOEXEC, _MS_NOSUID, _MS_PRIVATE, _MS_RDONLY, _MS_REC, _MS_REMOUNT,
    _PATH, _PR_SET_CHILD_SUBREAPER, _PR_SET_DUMPABLE, _PR_SET_NO_NEW_PRIVS,
    _PR_SET_PDEATHSIG, _REPLY, _TASK, STOPPED_BY, Limits, SandboxError, SandboxRun,
    _cgroup_members, _drop_capabilities, _kill_until_gone, _libc_call, _mount,
    _pids_of_uid, _prctl, _probe, _process_table, _read_frame, _read_only_remount_flags,
    _reap_children, _remove_tree, _write_frame,
)

_REPORT_FD = 3
_ROOT_DIRS = ("/usr",)
_ROOT_LINKS_OR_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_DEVICES = ("null", "zero", "random", "urandom")
_SHARED_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


class _Worker:
  """One fork server: sets up isolation once, then forks a sandboxed run per task."""

  def __init__(self, config: dict):
    self.limits = Limits(**config["limits"])
    self.uid, self.gid = config["uid"], config["gid"]
    self.base_dir = config["base_dir"]
    self.disabled: list[str] = []
    namespace: dict = {"__name__": "sandbox_harness"}
    exec(compile(config["harness"], "<harness>", "exec"), namespace)  # pylint: disable=exec-used
    self.harness = namespace["run"]
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    if self.uid is None:
      self.disabled.append(
          "separate uid: the verifier is not root, so programs run as its "
          "user (without capabilities)"
      )
    self.cgroup = config.get("cgroup")
    self.oom_event = None
    if self.cgroup is not None and self.cgroup["version"] == 1:
      # v1 freezes a tree at its cap (the OOM killer is off for the slot) and signals it here.
      self.oom_event = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
      control = os.open(os.path.join(self.cgroup["memory_dir"], "memory.oom_control"),
                        os.O_RDONLY | os.O_CLOEXEC)
      try:
        with open(os.path.join(self.cgroup["memory_dir"], "cgroup.event_control"), "w",
                  encoding="ascii") as f:
          f.write(f"{self.oom_event} {control}")
      finally:
        os.close(control)
    self.root_dir = None
    if not config["namespaces"]:
      self.disabled.append("namespaces: turned off by the caller")
    elif self._enter_namespaces():
      self.root_dir = self._build_root()

  def _enter_namespaces(self) -> bool:
    """Private network and mount namespaces for the worker (via a user namespace if not root)."""
    uid, gid = os.getuid(), os.getgid()
    try:
      _libc_call(
          "unshare", _CLONE_NEWNS | _CLONE_NEWNET | (_CLONE_NEWUSER if self.uid is None else 0)
      )
      if self.uid is None:
        for name, text in (
            ("setgroups", "deny"),
            ("uid_map", f"{uid} {uid} 1"),
            ("gid_map", f"{gid} {gid} 1"),
        ):
          with open(f"/proc/self/{name}", "w", encoding="ascii") as f:
            f.write(text)
      _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
      return True
    except OSError as exc:
      self.disabled.append(f"namespaces (network, mount, PID, IPC): {exc}")
      return False

  def _build_root(self) -> str | None:
    """A minimal read-only root in the worker's mount namespace, or None if mounts fail."""
    root = os.path.join(self.base_dir, "root")
    try:
      _mount("tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
      prefixes = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix)}
      for path in _ROOT_LINKS_OR_DIRS + _ROOT_DIRS + tuple(sorted(prefixes)):
        target = root + path
        if os.path.islink(path):
          os.symlink(os.readlink(path), target)
        elif os.path.isdir(path) and not os.path.exists(target):
          os.makedirs(target, mode=0o755)
          _mount(path, target, None, _MS_BIND | _MS_REC)
          _mount(None, target, None, _read_only_remount_flags(path))
      for directory in ("dev", "proc", "tmp"):
        os.makedirs(os.path.join(root, directory), mode=0o755, exist_ok=True)
      for device in _DEVICES:
        open(os.path.join(root, "dev", device), "wb").close()
        _mount(f"/dev/{device}", os.path.join(root, "dev", device), None, _MS_BIND)
      os.symlink("/tmp", os.path.join(root, "dev", "shm"))
      _mount(None, root, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
      return root
    except OSError as exc:
      self.disabled.append(f"private root and PID namespace: {exc}")
      return None

  def isolation(self) -> dict:
    """What is active, confirmed by a probe run (which falls back if the root fails)."""
    probe = self.run(b"", 10.0, _probe)
    if probe.exit_code != 0 and self.root_dir is not None:
      self.disabled.append(f"private root and PID namespace: a probe run failed ({probe})")
      self.root_dir = None
      probe = self.run(b"", 10.0, _probe)
    if probe.exit_code != 0:
      raise SandboxError(f"A sandboxed probe run failed: {probe}")
    facts = json.loads(probe.report.decode("utf-8"))
    budget = "per-process rlimits only"
    if self.cgroup is not None:
      groups = [os.path.basename(os.path.dirname(d)) + "/" + os.path.basename(d)
                for d in self.cgroup["dirs"]]
      if not all(group in facts["cgroups"] for group in groups):
        raise SandboxError(f"A sandboxed probe run is not in its cgroups {groups}: {facts}")
      budget = f"cgroup v{self.cgroup['version']} per run (memory, pids)"
    if not facts["stdlib_readable"]:
      self.disabled.append(
          f"imports beyond the harness's preloaded modules: runs cannot read "
          f"{os.path.dirname(os.__file__)}"
      )
    if self.uid is None:
      dropped = facts["capabilities"] == 0
    else:
      dropped = (facts["uid"], facts["gid"], facts["groups"]) == (self.uid, self.gid, [])
    return {
        "verifier_is_root": self.uid is not None,
        "sandbox_uid": self.uid,
        "privileges_dropped": dropped,
        "network_isolated": not facts["network"].startswith("reachable"),
        "private_root": self.root_dir is not None,
        "pid_namespace": facts["pid"] == 1,
        "cleanup": (
            "kill all processes of the slot uid"
            if self.uid is not None
            else "kill all descendants of the worker (a child subreaper)"
        ),
        "limits": dataclasses.asdict(self.limits),
        "run_budget": budget,
        "disabled": self.disabled,
        "probe": facts,
    }

  def serve(self, fd_in: int, fd_out: int) -> None:
    """Answers tasks until the parent closes the pipe."""
    while True:
      try:
        frame = _read_frame(fd_in)
      except EOFError:
        return
      timeout_s, size = _TASK.unpack_from(frame)
      result = self.run(frame[_TASK.size : _TASK.size + size], timeout_s, self.harness)
      _write_frame(
          fd_out,
          _REPLY.pack(
              result.timed_out,
              STOPPED_BY.index(result.stopped_by),
              result.exit_code,
              result.wall_s,
              result.cpu_s,
              len(result.report),
          )
          + result.report,
      )

  def run(self, payload: bytes, timeout_s: float, main: Callable[[bytes, int], None]) -> SandboxRun:
    """Runs `main(payload, report_fd)` in a fresh sandboxed process."""
    start = time.monotonic()
    workdir = None
    if self.root_dir is None:
      workdir = tempfile.mkdtemp(dir=os.path.join(self.base_dir, "runs"))
      if self.uid is not None:
        os.chown(workdir, self.uid, self.gid)
    nproc = self.limits.max_processes
    if self.uid is None:  # RLIMIT_NPROC counts every task of the (shared) real uid.
      nproc += sum(
          threads for _, owner, threads in _process_table().values() if owner == os.getuid()
      )
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
      self._intermediate(payload, timeout_s, main, read_fd, write_fd, workdir, nproc)
    os.close(write_fd)
    oom_kills = self._oom_kills()
    report, stopped_by = self._collect(read_fd, pid, start + timeout_s)
    if stopped_by:
      os.killpg(pid, signal.SIGKILL)
    _, status, usage = os.wait4(pid, 0)
    # With the private root, a run that ended by itself left nothing: its PID namespace
    # died with it. Otherwise processes may have detached (setsid) and outlived it.
    if stopped_by or self.root_dir is None:
      self._kill_leftovers()
    if not stopped_by and self._oom_kills() > oom_kills:
      stopped_by = "memory_budget"  # v2: the kernel killed the whole tree (memory.oom.group).
    _reap_children()
    report += self._drain(read_fd, len(report))
    os.close(read_fd)
    if workdir is not None:
      _remove_tree(workdir)
    return SandboxRun(
        bytes(report),
        bool(stopped_by),
        os.waitstatus_to_exitcode(status),
        time.monotonic() - start,
        usage.ru_utime + usage.ru_stime,
        stopped_by,
    )

  def _oom_kills(self) -> int:
    """OOM kills in the slot's v2 cgroup so far (0 without one)."""
    if self.cgroup is None or self.cgroup["version"] != 2:
      return 0
    with open(os.path.join(self.cgroup["memory_dir"], "memory.events"), encoding="ascii") as f:
      return int(dict(line.split() for line in f if line.strip()).get("oom_kill", 0))

  def _under_oom(self) -> bool:
    """Whether the slot's v1 cgroup is at its memory cap, its tasks frozen (drains the event)."""
    try:
      os.eventfd_read(self.oom_event)
    except BlockingIOError:
      pass
    with open(os.path.join(self.cgroup["memory_dir"], "memory.oom_control"),
              encoding="ascii") as f:
      return dict(line.split() for line in f if line.strip()).get("under_oom") == "1"

  def _collect(self, read_fd: int, pid: int, deadline: float) -> tuple[bytearray, str]:
    """Reads the report until the run exits or a limit stops it ("" or a STOPPED_BY value)."""
    report, pidfd = bytearray(), os.pidfd_open(pid)
    waiting = [read_fd, pidfd] + ([] if self.oom_event is None else [self.oom_event])
    try:
      while pidfd in waiting:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
          return report, "wall_clock"
        ready, _, _ = select.select(waiting, [], [], remaining)
        if self.oom_event is not None and self.oom_event in ready and self._under_oom():
          return report, "memory_budget"
        if read_fd in ready:
          chunk = os.read(read_fd, 1 << 20)
          report += chunk[: self.limits.max_report_bytes - len(report)]
          if not chunk:  # Every writer closed the pipe.
            waiting.remove(read_fd)
        if pidfd in ready:
          waiting.remove(pidfd)
      return report, ""
    finally:
      os.close(pidfd)

  def _drain(self, read_fd: int, have: int) -> bytes:
    """What is left in the report pipe once every writer is dead."""
    os.set_blocking(read_fd, False)
    chunks = []
    while True:
      try:
        chunk = os.read(read_fd, 1 << 20)
      except BlockingIOError:
        break
      if not chunk:
        break
      chunks.append(chunk)
    return b"".join(chunks)[: max(0, self.limits.max_report_bytes - have)]

  def _kill_leftovers(self) -> None:
    """Kills every process a run left, however it detached itself, and waits for the end."""
    if self.cgroup is not None:  # Its cgroup holds all of them, frozen ones included.
      _kill_until_gone(lambda: _cgroup_members(self.cgroup["dirs"]))
    if self.uid is None:
      _kill_until_gone(self._descendants)
      return
    killer = os.fork()
    if killer == 0:
      try:
        os.setgroups([])
        os.setresgid(self.gid, self.gid, self.gid)
        os.setresuid(self.uid, self.uid, self.uid)
        os.kill(-1, signal.SIGKILL)  # Every process of the slot uid, atomically.
      finally:
        os._exit(0)
    os.waitpid(killer, 0)
    _kill_until_gone(lambda: _pids_of_uid(self.uid))
    if self.root_dir is None:
      self._remove_shared_tmp_files()

  def _remove_shared_tmp_files(self) -> None:
    """Without the private root, a run could write to the host's world-writable dirs."""
    for directory in _SHARED_TMP_DIRS:
      try:
        entries = list(os.scandir(directory))
      except OSError:
        continue
      for entry in entries:
        try:
          if entry.stat(follow_symlinks=False).st_uid != self.uid:
            continue
          if entry.is_dir(follow_symlinks=False):
            _remove_tree(entry.path)
          else:
            os.unlink(entry.path)
        except OSError:
          continue

  def _descendants(self) -> list[int]:
    table, found, frontier = _process_table(), [], [os.getpid()]
    while frontier:
      parent = frontier.pop()
      children = [pid for pid, (ppid, _, _) in table.items() if ppid == parent]
      found += children
      frontier += children
    return found

  def _intermediate(self, payload, timeout_s, main, read_fd, write_fd, workdir, nproc):
    """Child A (verifier credentials): new namespaces, then fork the run and wait for it."""
    code = 125
    try:
      os.close(read_fd)
      os.setpgid(0, 0)
      _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
      if self.root_dir is not None:
        _libc_call("unshare", _CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWIPC)
      run = os.fork()
      if run == 0:
        self._sandboxed(payload, timeout_s, main, write_fd, workdir, nproc)
      os.close(write_fd)
      code = os.waitstatus_to_exitcode(os.waitpid(run, 0)[1])
      code = code if code >= 0 else 128 - code
    finally:
      os._exit(code)

  def _sandboxed(self, payload, timeout_s, main, write_fd, workdir, nproc):
    """Child B: enter the private root, drop everything, run `main`. Never returns."""
    code = 126
    try:
      if self.cgroup is not None:  # Before anything of the run can fork.
        for directory in self.cgroup["dirs"]:
          with open(os.path.join(directory, "cgroup.procs"), "w", encoding="ascii") as f:
            f.write("0")
      home = workdir
      if self.root_dir is not None:
        owner = f"uid={self.uid},gid={self.gid}," if self.uid is not None else ""
        _mount(
            "tmpfs",
            self.root_dir + "/tmp",
            "tmpfs",
            _MS_NOSUID | _MS_NODEV | _MS_NOEXEC,
            f"{owner}size={self.limits.tmpfs_bytes},nr_inodes=4096,mode=0700",
        )
        _mount("proc", self.root_dir + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
        os.chroot(self.root_dir)
        home = "/tmp"
      os.chdir(home)
      devnull = os.open("/dev/null", os.O_RDWR)
      for fd in (0, 1, 2):
        os.dup2(devnull, fd)
      os.dup2(write_fd, _REPORT_FD)
      os.closerange(_REPORT_FD + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
      cpu_s = math.ceil(timeout_s) + 1
      for limit, value in (
          (resource.RLIMIT_CPU, cpu_s),
          (resource.RLIMIT_CORE, 0),
          (resource.RLIMIT_AS, self.limits.memory_bytes),
          (resource.RLIMIT_NPROC, nproc),
          (resource.RLIMIT_FSIZE, self.limits.max_file_bytes),
          (resource.RLIMIT_NOFILE, self.limits.max_open_files),
      ):
        resource.setrlimit(limit, (value, value))
      if self.uid is not None:
        os.setgroups([])
        os.setresgid(self.gid, self.gid, self.gid)
        os.setresuid(self.uid, self.uid, self.uid)  # Clears every capability.
        _prctl(_PR_SET_DUMPABLE, 1)  # Own /proc/self entries again (no core dumps: RLIMIT_CORE).
      else:
        _drop_capabilities()
      _prctl(_PR_SET_NO_NEW_PRIVS, 1)
      _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
      os.environ.clear()
      os.environ.update(HOME=home, TMPDIR=home, PATH=_PATH, LANG="C.UTF-8")
      tempfile.tempdir = None
      main(payload, _REPORT_FD)
      code = 0
    finally:
      os._exit(code)


def _worker_main() -> None:
  """Entry point of a worker process (run as a script by `SandboxPool`)."""
  os.umask(0o022)
  fd_in, fd_out = os.dup(0), os.dup(1)
  devnull = os.open(os.devnull, os.O_RDWR)
  os.dup2(devnull, 0)
  os.dup2(devnull, 1)
  worker = _Worker(json.loads(_read_frame(fd_in)))
  _write_frame(fd_out, json.dumps(worker.isolation()).encode("utf-8"))
  gc.freeze()  # Forked runs then leave the worker's objects (and their pages) alone.
  worker.serve(fd_in, fd_out)


if __name__ == "__main__":
  _worker_main()
