"""Orbax checkpoints of the whole training state, restored directly onto the mesh.

A checkpoint holds the TrainState (step, params, optimizer state, teacher, RNG) and a
small JSON record (data position, config fingerprint). Because the data order is a
function of (seed, step) and every random draw of the step is `fold_in(rng, step)`, a
resumed run continues exactly as if it had never stopped.

Faults:
- Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it to `<step>` once
  complete, so a process killed during a save (SIGKILL included) leaves the earlier steps
  untouched and an unfinished temporary directory, which the next start removes.
- After orbax commits a step, every file of it is read back, synced to disk and recorded
  (size and CRC-32) in `<step>/manifest.json`, written last and atomically. At restore a
  step whose files do not match its manifest (truncated, corrupted, missing), or that fails
  to restore, is moved to `<directory>-damaged/` with a warning naming it, and the newest
  intact step is used instead. A step without a manifest (the process died between the
  orbax commit and the manifest) is used if it restores.
- A save that fails (a full disk, an unwritable directory) is logged and counted in
  `failed_saves`; its partial files are removed and earlier checkpoints are not touched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zlib

import jax
import orbax.checkpoint as ocp

MANIFEST = "manifest.json"
_TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
  """No checkpoint in the directory can be restored."""


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
    os.fsync(f.fileno())
  return crc


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _files(step_dir: str) -> list[str]:
  """Paths relative to `step_dir` of its files, the manifest excluded, sorted."""
  found = []
  for parent, _, names in os.walk(step_dir):
    for name in names:
      relative = os.path.relpath(os.path.join(parent, name), step_dir)
      if relative != MANIFEST:
        found.append(relative)
  return sorted(found)


def write_manifest(step_dir: str) -> None:
  """Syncs every file of a committed step to disk and records its size and CRC-32."""
  entries = {}
  for relative in _files(step_dir):
    path = os.path.join(step_dir, relative)
    entries[relative] = [os.path.getsize(path), _crc32(path)]
  for parent, _, _ in os.walk(step_dir):
    _fsync_dir(parent)
  tmp = os.path.join(step_dir, MANIFEST + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump({"files": entries}, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST))
  _fsync_dir(step_dir)


def check_manifest(step_dir: str) -> str | None:
  """Why the step's files differ from its manifest; None if they match or it has none."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      entries = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as exc:
    return f"unreadable {MANIFEST}: {exc}"
  for relative, (size, crc) in sorted(entries.items()):
    file_path = os.path.join(step_dir, relative)
    if not os.path.exists(file_path):
      return f"{relative} is missing"
    actual = os.path.getsize(file_path)
    if actual != size:
      return f"{relative} has {actual} bytes, {size} were written"
    if _crc32(file_path) != crc:
      return f"{relative} does not match its CRC-32 (corrupted)"
  extra = sorted(set(_files(step_dir)) - set(entries))
  if extra:
    return f"files not written by the save: {extra[:3]}"
  return None


class Checkpointer:
  """Saves every `every` steps (and on demand), keeps the last `keep`."""

  def __init__(self, directory: str, *, every: int, keep: int = 3):
    self.every = every
    self.directory = os.path.abspath(directory)
    self.failed_saves = 0
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True),
        item_names=("state", "meta"))

  def latest_step(self):
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state, meta: dict) -> bool:
    """Writes the state at `step` and blocks until it is on disk.

    Returns False (logged, counted in `failed_saves`) if the save failed; earlier
    checkpoints are kept either way.
    """
    if step in self._manager.all_steps():
      return True
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
      self._manager.wait_until_finished()
      if jax.process_index() == 0:
        write_manifest(self.step_dir(step))
      return True
    except Exception as exc:  # pylint: disable=broad-except  # Reported; training goes on.
      self.failed_saves += 1
      logging.error("Saving the checkpoint of step %d in %s failed (%s: %s); the earlier "
                    "checkpoints %s are kept.", step, self.directory, type(exc).__name__,
                    exc, self.all_steps())
      self._remove_partial(step)
      return False

  def _remove_partial(self, step: int) -> None:
    """Removes what a failed save of `step` left (its temporary or manifest-less files)."""
    for name in os.listdir(self.directory):
      if name == str(step) or name.startswith(f"{step}{_TMP_MARK}"):
        path = os.path.join(self.directory, name)
        if name == str(step) and os.path.exists(os.path.join(path, MANIFEST)):
          continue
        shutil.rmtree(path, ignore_errors=True)
    self._manager.reload()

  def restore(self, step: int, abstract_state):
    """(state, meta) at `step`; arrays land on the shardings of `abstract_state`."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored.state, restored.meta

  def restore_latest(self, abstract_state):
    """(step, state, meta) of the newest intact checkpoint; None if there is none.

    A damaged step (see the module docstring) is moved to `<directory>-damaged/` with a
    warning and the next older one is tried. Raises CheckpointError if steps exist but
    none of them can be restored.
    """
    problems = []
    for step in sorted(self.all_steps(), reverse=True):
      step_dir = self.step_dir(step)
      problem = check_manifest(step_dir)
      if problem is None:
        try:
          state, meta = self.restore(step, abstract_state)
          if problems:
            logging.warning("Resuming from step %d, the newest intact checkpoint.", step)
          return step, state, meta
        except Exception as exc:  # pylint: disable=broad-except  # Falls back, logged.
          problem = f"restore failed: {type(exc).__name__}: {str(exc)[:500]}"
      problems.append(f"{step_dir}: {problem}")
      moved = self._set_aside(step) if jax.process_index() == 0 else "(by process 0)"
      logging.warning("Checkpoint %s is damaged (%s); moved it to %s and trying the "
                      "previous one.", step_dir, problem, moved)
    if problems:
      raise CheckpointError("No checkpoint could be restored: " + "; ".join(problems))
    return None

  def _set_aside(self, step: int) -> str:
    """Moves a damaged step out of the manager's directory; returns where it went."""
    damaged = self.directory + "-damaged"
    os.makedirs(damaged, exist_ok=True)
    target = os.path.join(damaged, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
    os.rename(self.step_dir(step), target)
    self._manager.reload()
    return target

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(state, shardings):
  """ShapeDtypeStructs carrying the target shardings (restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)
