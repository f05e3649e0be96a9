"""The worker side of the sandbox (see sandbox.py): a fork server that isolates every run.

`SandboxPool` starts each worker as a script (`python -I -S -B -X utf8 sandbox_worker.py`),
so this module imports only the standard library, and none of the modules whose at-fork
hooks slow down every fork (logging, queue, subprocess, threading). A worker enters its
namespaces and builds the private root once, confirms the isolation with a probe run, then
forks a run per task: new namespaces, the private root, dropped credentials and rlimits
around the harness, and afterwards the removal of whatever the run left behind. The types
and the framing that the pool shares with its workers are defined here.

Where the pool has a cgroup for the worker's slot (sandbox_cgroups.py), every run joins it
before it drops its privileges, so the run's whole process tree shares one memory and
process budget; a run that reaches the memory cap is stopped and reported as such.

Worker protocol: frames of a 4-byte big-endian length and a body. Start-up: a JSON
config in, a JSON isolation report out. Task: `!dI` (timeout_s, payload length) and the
payload in; reply `!?BiddI` (timed_out, stop code, exit code, wall_s, cpu_s, report length)
and the report out.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import math
import os
import resource
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Callable

_CLONE_NEWNS = 0x00020000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME, _MS_BIND = 32, 1024, 2048, 4096
_MS_REC, _MS_PRIVATE, _MS_RELATIME = 16384, 1 << 18, 1 << 21
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE = 1, 4
_PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 36, 38

_TASK = struct.Struct("!dI")
_REPLY = struct.Struct("!?BiddI")
# Why the sandbox stopped a run (the stop code of a reply).
STOPPED_BY = ("", "wall_clock", "memory_budget")
_LENGTH = struct.Struct("!I")
_REPORT_FD = 3
_SWEEP_S = 2.0
_ROOT_DIRS = ("/usr",)
_ROOT_LINKS_OR_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_DEVICES = ("null", "zero", "random", "urandom")
_SHARED_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
_PATH = "/usr/local/bin:/usr/bin:/bin"


class SandboxError(RuntimeError):
  """The sandbox itself failed (a worker died or stopped answering)."""


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-run resource limits.

  Attributes:
    memory_bytes: RLIMIT_AS of every process of a run.
    max_processes: RLIMIT_NPROC: tasks (processes and threads) a run may have at once.
    max_file_bytes: RLIMIT_FSIZE: the largest file a run may write.
    max_open_files: RLIMIT_NOFILE.
    tmpfs_bytes: size of the private /tmp (when the private root is active).
    max_report_bytes: reports beyond this are cut (and so fail to parse).
  """

  memory_bytes: int = 1 << 30
  max_processes: int = 8
  max_file_bytes: int = 16 << 20
  max_open_files: int = 64
  tmpfs_bytes: int = 64 << 20
  max_report_bytes: int = 64 << 20

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"Limits.{field.name} must be a positive int, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class SandboxRun:
  """The outcome of one run: its report (bytes written to fd 3, bounded) and how it ended.

  Attributes:
    report: what the run wrote to fd 3 (at most `Limits.max_report_bytes`).
    timed_out: the sandbox stopped the run at a limit before it ended: its wall clock, or
      the memory budget of its whole process tree; `stopped_by` says which.
    exit_code: of the run's first process (negative: killed by that signal).
    wall_s, cpu_s: wall-clock and CPU seconds of the run.
    stopped_by: "" (the run ended by itself), "wall_clock" or "memory_budget".
  """

  report: bytes
  timed_out: bool
  exit_code: int
  wall_s: float
  cpu_s: float
  stopped_by: str = ""

  @property
  def reason(self) -> str:
    """Why the sandbox stopped the run, as a sentence ("" if it ended by itself)."""
    if self.stopped_by == "memory_budget":
      return "Stopped: the program's processes together reached the memory budget of the run."
    if self.stopped_by == "wall_clock":
      return f"Stopped: time limit exceeded (killed after {self.wall_s:.1f} s)."
    return ""


# ---------------------------------------------------------------- Shared helpers.


_LIBC = ctypes.CDLL(None, use_errno=True)


def _libc_call(name: str, *args) -> None:
  """Calls a libc function that returns 0 on success; raises OSError otherwise."""
  if getattr(_LIBC, name)(*args) != 0:
    errno = ctypes.get_errno()
    raise OSError(errno, f"{name}{args!r}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = ""):
  names = [None if text is None else text.encode() for text in (source, target, fstype)]
  _libc_call("mount", *names, ctypes.c_ulong(flags), data.encode() if data else None)


def _prctl(option: int, value: int) -> None:
  _libc_call("prctl", option, *(ctypes.c_ulong(arg) for arg in (value, 0, 0, 0)))


class _CapHeader(ctypes.Structure):
  _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
  _fields_ = [
      ("effective", ctypes.c_uint32),
      ("permitted", ctypes.c_uint32),
      ("inheritable", ctypes.c_uint32),
  ]


def _drop_capabilities() -> None:
  """Clears every capability of this process (those a user namespace granted)."""
  _libc_call("capset", ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), (_CapData * 2)())


def _read_only_remount_flags(path: str) -> int:
  """Flags that remount the bind mount at `path` read-only, keeping its locked flags."""
  flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV
  current = os.statvfs(path).f_flag
  for st_flag, ms_flag in (
      (os.ST_NOEXEC, _MS_NOEXEC),
      (os.ST_NOATIME, _MS_NOATIME),
      (os.ST_NODIRATIME, _MS_NODIRATIME),
      (os.ST_RELATIME, _MS_RELATIME),
  ):
    if current & st_flag:
      flags |= ms_flag
  return flags


def _process_table() -> dict[int, tuple[int, int, int]]:
  """pid -> (parent pid, real uid, number of threads) of every visible process."""
  table = {}
  for name in os.listdir("/proc"):
    if not name.isdigit():
      continue
    try:
      with open(f"/proc/{name}/status", encoding="utf-8") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
      table[int(name)] = (
          int(fields["PPid"]),
          int(fields["Uid"].split()[0]),
          int(fields["Threads"]),
      )
    except (OSError, KeyError, ValueError):
      continue
  return table


def _kill_until_gone(select_pids: Callable[[], list[int]]) -> None:
  """SIGKILLs the selected processes (and reaps own children) until none is left."""
  stop = time.monotonic() + _SWEEP_S
  while (pids := select_pids()) and time.monotonic() < stop:
    for pid in pids:
      try:
        os.kill(pid, signal.SIGKILL)
      except (ProcessLookupError, PermissionError):
        pass
    _reap_children()
    time.sleep(0.005)


def _reap_children() -> None:
  """Reaps every exited child of this process without blocking."""
  while True:
    try:
      pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
      return
    if pid == 0:
      return


def _cgroup_members(directories: list[str]) -> list[int]:
  pids = []
  for directory in directories:
    with open(os.path.join(directory, "cgroup.procs"), encoding="ascii") as f:
      pids += [int(pid) for pid in f.read().split()]
  return pids


def _pids_of_uid(uid: int) -> list[int]:
  return [pid for pid, (_, owner, _) in _process_table().items() if owner == uid]


def _write_frame(fd: int, body: bytes) -> None:
  view = memoryview(_LENGTH.pack(len(body)) + body)
  while view:
    view = view[os.write(fd, view) :]


def _read_exactly(fd: int, size: int, deadline: float | None) -> bytes:
  chunks, remaining = [], size
  while remaining:
    if deadline is not None:
      ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
      if not ready:
        raise TimeoutError("no answer from the sandbox worker in time")
    chunk = os.read(fd, min(remaining, 1 << 20))
    if not chunk:
      raise EOFError("the sandbox worker closed its pipe")
    chunks.append(chunk)
    remaining -= len(chunk)
  return b"".join(chunks)


def _read_frame(fd: int, deadline: float | None = None) -> bytes:
  (size,) = _LENGTH.unpack(_read_exactly(fd, _LENGTH.size, deadline))
  return _read_exactly(fd, size, deadline)


# ---------------------------------------------------------------- Worker side.


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


def _probe(payload: bytes, report_fd: int) -> None:
  """Reports what a run sees; used once per worker to confirm the isolation."""
  del payload
  with open("/proc/self/status", encoding="utf-8") as f:
    capabilities = int(dict(line.split(":", 1) for line in f if ":" in line)["CapEff"], 16)
  facts = {
      "uid": os.getuid(),
      "gid": os.getgid(),
      "groups": os.getgroups(),
      "capabilities": capabilities,
      "pid": os.getpid(),
      "cwd": os.getcwd(),
      "environment": sorted(os.environ),
      "root_entries": sorted(os.listdir("/")),
      "stdlib_readable": os.access(os.path.dirname(os.__file__), os.R_OK | os.X_OK),
  }
  with open("/proc/self/cgroup", encoding="utf-8") as f:
    facts["cgroups"] = f.read()
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    probe.settimeout(1.0)
    try:
      probe.connect((b"127.0.0.1", 9))  # A bytes host needs no codec import.
      facts["network"] = "reachable"
    except ConnectionRefusedError:
      facts["network"] = "reachable (connection refused)"
    except OSError as exc:
      facts["network"] = f"unreachable ({os.strerror(exc.errno) if exc.errno else exc})"
  os.write(report_fd, json.dumps(facts).encode("utf-8"))


def _make_owner_traversable(path: str) -> None:
  os.chmod(path, 0o700)
  with os.scandir(path) as entries:
    for entry in entries:
      if entry.is_dir(follow_symlinks=False):
        _make_owner_traversable(entry.path)


def _remove_tree(path: str) -> None:
  """rmtree that also removes directories a run made unreadable (chmod 0)."""
  try:
    shutil.rmtree(path)
  except OSError:
    _make_owner_traversable(path)
    shutil.rmtree(path, ignore_errors=True)


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
