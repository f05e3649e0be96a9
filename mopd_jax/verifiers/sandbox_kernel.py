"""What the sandbox's pool and its workers share: types, protocol and system-call helpers.

sandbox_worker.py imports this module from its own directory when `SandboxPool` starts it
as a script (`python -I -S -B -X utf8 sandbox_worker.py`), so this module too imports only
the standard library, and none of the modules whose at-fork hooks slow down every fork
(logging, queue, subprocess, threading). sandbox.py imports it as part of the package;
`Limits`, `SandboxError` and `SandboxRun` are part of that module's interface.

Here are the limits and the outcome of a run, the framing of the protocol below, the libc
calls behind the isolation (mount, prctl and capset through ctypes, with their flags), the
cleanup helpers of both sides (the process table read from /proc, killing a set of
processes until none is left, reaping children, removing a tree that a run made
unreadable), and the probe with which a worker confirms its isolation.

Worker protocol: frames of a 4-byte big-endian length and a body. Start-up: a JSON
config in, a JSON isolation report out. Task: `!dI` (timeout_s, payload length) and the
payload in; reply `!?BiddI` (timed_out, stop code, exit code, wall_s, cpu_s, report length)
and the report out.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import select
import shutil
import signal
import socket
import struct
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
_SWEEP_S = 2.0
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
