"""One memory and process budget per sandboxed run: a cgroup per pool slot.

A run and everything it starts join its slot's cgroup, which caps the memory of the whole
process tree (default 1 GiB, no swap) and the number of its tasks. Runs of a slot follow
each other and each run's processes are gone before the next starts, so the cap is one
response's budget. When the tree reaches the memory cap it is stopped as a whole:

- cgroup v2 (preferred, where the `memory` and `pids` controllers can be enabled below the
  verifier's own cgroup): `memory.oom.group` makes the kernel kill every task of the run.
- cgroup v1 (`memory` and `pids` hierarchies): the OOM killer is disabled for the slot, so
  the tree freezes at the cap; the worker is notified through an eventfd and kills it.

The worker reads the slot's counters (sandbox_worker.py) and reports a run stopped this way
with its reason. A pool's cgroups are named `mopd-sandbox-<pid namespace>-<pid>-<start
time>-<suffix>` after the process that made them (`owner_tag`), so that a later pool in the
same PID namespace can tell those of a dead owner and remove them (`remove_stale`); groups
made from other PID namespaces are never touched. Where no cgroup can be used (no root, no delegated v2 subtree, no
controllers), `CgroupBudget.kind` is None, `reason` says why and the per-process rlimits
remain the only memory and process limits.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time

_CONTROLLERS = ("memory", "pids")
_NAME = re.compile(r"^mopd-sandbox-(\d+)-(\d+)-(\d+)-")
_KILL_S = 2.0


def process_start_time(pid: int) -> int | None:
  """Start time of `pid` in clock ticks since boot (None if there is no such process)."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
      # Field 22; the command name (field 2) may contain spaces and parentheses.
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


def owner_tag() -> str:
  """`<pid namespace inode>-<pid>-<start time>` of this process: who owns a pool's things."""
  pid = os.getpid()
  return f"{os.stat('/proc/self/ns/pid').st_ino}-{pid}-{process_start_time(pid)}"


def stale_owner(name: str) -> bool:
  """Whether `name` carries an owner tag of this PID namespace whose process is gone."""
  match = _NAME.match(name)
  if match is None:
    return False
  namespace, pid, start_time = (int(group) for group in match.groups())
  if namespace != os.stat("/proc/self/ns/pid").st_ino:
    return False  # Its pids mean other processes here: leave it to its own namespace.
  return process_start_time(pid) != start_time  # A reused pid has another start time.


def _unescape(path: str) -> str:
  """A mountinfo path with its octal escapes (space, tab, newline, backslash) decoded."""
  return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def own_cgroup_dirs() -> dict[str, str]:
  """Directory of this process's cgroup per hierarchy: 'unified' (v2) and v1 controller names."""
  with open("/proc/self/cgroup", encoding="utf-8") as f:
    membership = {}
    for line in f:
      hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
      names = ["unified"] if hierarchy == "0" else controllers.split(",")
      for name in names:
        membership[name] = path
  dirs = {}
  with open("/proc/self/mountinfo", encoding="utf-8") as f:
    for line in f:
      fields, _, tail = line.rstrip("\n").partition(" - ")
      fields, tail = fields.split(), tail.split()
      if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
        continue
      root, mount_point = _unescape(fields[3]), _unescape(fields[4])
      names = ["unified"] if tail[0] == "cgroup2" else tail[2].split(",")
      for name in names:
        path = membership.get(name)
        if path is None or name in dirs:
          continue
        if root != "/" and not (path == root or path.startswith(root + "/")):
          continue  # This mount shows another part of the hierarchy.
        relative = path[len(root):] if root != "/" else path
        dirs[name] = mount_point + relative.rstrip("/")
  return dirs


def _write(path: str, text: str) -> None:
  with open(path, "w", encoding="ascii") as f:
    f.write(text)


def _read(path: str) -> str:
  with open(path, encoding="ascii") as f:
    return f.read()


def members(directory: str) -> list[int]:
  """Process ids in the cgroup at `directory` (empty if it does not exist)."""
  try:
    return [int(pid) for pid in _read(os.path.join(directory, "cgroup.procs")).split()]
  except (OSError, ValueError):
    return []


def _kill_members(directories: list[str]) -> None:
  """SIGKILLs every process of these cgroups until they are empty (or 2 s passed)."""
  stop = time.monotonic() + _KILL_S
  while (pids := [pid for d in directories for pid in members(d)]) and time.monotonic() < stop:
    for pid in pids:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    time.sleep(0.005)


def _remove_group(directory: str) -> None:
  """Empties and removes a cgroup and its sub-groups (a cgroup directory holds no files)."""
  if not os.path.isdir(directory):
    return
  children = [e.path for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
  for child in children:
    _remove_group(child)
  _kill_members([directory])
  for _ in range(100):  # rmdir fails while exiting tasks still hold the group.
    try:
      os.rmdir(directory)
      return
    except FileNotFoundError:
      return
    except OSError:
      time.sleep(0.01)
  os.rmdir(directory)


def remove_stale(parents: list[str] | None = None) -> list[str]:
  """Removes the cgroups of pools whose owner process is gone; returns their paths.

  Args:
    parents: directories to look in; defaults to this process's cgroups (where a pool of
      this process, or of an earlier run in the same place, makes them).
  """
  if parents is None:
    dirs = own_cgroup_dirs()
    parents = [dirs[name] for name in ("unified",) + _CONTROLLERS if name in dirs]
  removed = []
  for parent in dict.fromkeys(parents):
    try:
      entries = [e for e in os.scandir(parent) if e.is_dir(follow_symlinks=False)]
    except OSError:
      continue
    for entry in entries:
      if not stale_owner(entry.name):
        continue
      try:
        _remove_group(entry.path)
        removed.append(entry.path)
      except OSError:
        continue
  return removed


class CgroupBudget:
  """The cgroups of one pool: a group per slot capping a run's memory and tasks.

  Attributes:
    kind: "v2", "v1" or None (no cgroup could be used).
    reason: why no cgroup is used (None when one is).
  """

  def __init__(self, name: str, memory_bytes: int, max_processes: int):
    """`name` must start with `mopd-sandbox-<owner_tag()>-`."""
    if _NAME.match(name) is None:
      raise ValueError(f"cgroup name {name!r} must start with 'mopd-sandbox-<owner tag>-'.")
    self.memory_bytes, self.max_processes = memory_bytes, max_processes
    self.kind: str | None = None
    self.reason: str | None = None
    self._groups: list[str] = []  # Pool-level groups, one per hierarchy used.
    self._slots: dict[int, list[str]] = {}
    failures = []
    try:
      dirs = own_cgroup_dirs()
    except OSError as exc:
      dirs, failures = {}, [f"cannot read this process's cgroups: {exc}"]
    for kind, setup in (("v2", self._setup_v2), ("v1", self._setup_v1)):
      self.kind = kind
      try:
        setup(dirs, name)
        break
      except OSError as exc:
        self.kind = None
        self._remove_groups()
        failures.append(f"{kind}: {exc.strerror or exc}" + (
            f" ({exc.filename})" if exc.filename else ""))
    if self.kind is None:
      self.reason = "no usable cgroup (" + "; ".join(failures) + ")"

  def _setup_v2(self, dirs: dict[str, str], name: str) -> None:
    own = dirs.get("unified")
    if own is None:
      raise OSError(0, "no cgroup2 hierarchy is mounted")
    available = _read(os.path.join(own, "cgroup.controllers")).split()
    missing = [c for c in _CONTROLLERS if c not in available]
    if missing:
      raise OSError(0, f"controllers {missing} are not available in {own}")
    enabled = _read(os.path.join(own, "cgroup.subtree_control")).split()
    if any(c not in enabled for c in _CONTROLLERS):
      # Fails (EBUSY) where `own` holds processes and is not the root: v2 then needs a
      # delegated, otherwise empty cgroup for the verifier.
      _write(os.path.join(own, "cgroup.subtree_control"), " ".join("+" + c for c in _CONTROLLERS))
    group = os.path.join(own, name)
    os.mkdir(group)
    self._groups.append(group)
    _write(os.path.join(group, "cgroup.subtree_control"), " ".join("+" + c for c in _CONTROLLERS))
    self._make_slot(-1)  # Fails here rather than at the first worker if limits cannot be set.

  def _setup_v1(self, dirs: dict[str, str], name: str) -> None:
    for controller in _CONTROLLERS:
      if controller not in dirs:
        raise OSError(0, f"no cgroup v1 {controller} hierarchy is mounted")
    for controller in _CONTROLLERS:
      group = os.path.join(dirs[controller], name)
      os.mkdir(group)
      self._groups.append(group)
    self._make_slot(-1)

  def _make_slot(self, index: int) -> list[str]:
    """Creates the group(s) of slot `index` with the limits; returns their directories."""
    slot_name = "probe" if index < 0 else f"slot-{index}"
    dirs = [os.path.join(group, slot_name) for group in self._groups]
    try:
      for directory in dirs:
        os.mkdir(directory)
      self._apply_limits(dirs)
    except OSError:
      for directory in dirs:
        if os.path.isdir(directory):
          os.rmdir(directory)
      raise
    if index < 0:
      for directory in dirs:
        os.rmdir(directory)
    return dirs

  def _apply_limits(self, dirs: list[str]) -> None:
    memory_dir, pids_dir = dirs[0], dirs[-1]
    if self.kind == "v2":
      _write(os.path.join(memory_dir, "memory.max"), str(self.memory_bytes))
      if os.path.exists(os.path.join(memory_dir, "memory.swap.max")):
        _write(os.path.join(memory_dir, "memory.swap.max"), "0")
      _write(os.path.join(memory_dir, "memory.oom.group"), "1")
    else:
      memsw = os.path.join(memory_dir, "memory.memsw.limit_in_bytes")
      has_memsw = os.path.exists(memsw)  # Only where swap accounting is on.
      if has_memsw and self.memory_bytes > int(_read(memsw)):
        _write(memsw, str(self.memory_bytes))  # memory + swap must stay >= memory.
      _write(os.path.join(memory_dir, "memory.limit_in_bytes"), str(self.memory_bytes))
      if has_memsw:
        _write(memsw, str(self.memory_bytes))  # No swap beyond the cap.
      _write(os.path.join(memory_dir, "memory.oom_control"), "1")
    _write(os.path.join(pids_dir, "pids.max"), str(self.max_processes))

  def set_limits(self, memory_bytes: int, max_processes: int) -> None:
    """Changes the caps of every slot (call while no run is in flight)."""
    self.memory_bytes, self.max_processes = memory_bytes, max_processes
    for dirs in self._slots.values():
      self._apply_limits(dirs)

  def slot_config(self, index: int) -> dict | None:
    """What the worker of slot `index` needs (None without cgroups); creates the slot once."""
    if self.kind is None:
      return None
    if index not in self._slots:
      self._slots[index] = self._make_slot(index)
    dirs = self._slots[index]
    return {"version": int(self.kind[1]), "dirs": dirs, "memory_dir": dirs[0],
            "memory_bytes": self.memory_bytes}

  def kill_slot(self, index: int) -> None:
    """Kills every process left in the slot's cgroup (a run of a worker that died)."""
    _kill_members(self._slots.get(index, []))

  def _remove_groups(self) -> None:
    for group in reversed(self._groups):
      _remove_group(group)
    self._groups, self._slots = [], {}

  def close(self) -> None:
    """Kills what is left in the pool's cgroups and removes them (a failure is logged)."""
    try:
      self._remove_groups()
    except OSError as exc:
      logging.warning("Could not remove the sandbox cgroups %s: %s", self._groups, exc)

  def describe(self) -> dict:
    """For the isolation report."""
    if self.kind is None:
      return {"cgroup": None, "reason": self.reason}
    return {"cgroup": self.kind, "memory_bytes": self.memory_bytes,
            "max_processes": self.max_processes, "groups": list(self._groups)}
