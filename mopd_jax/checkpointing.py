"""Orbax checkpoints of the whole training state, saved asynchronously, restored onto the mesh.

A checkpoint holds the TrainState (step, params, optimizer state, teacher, RNG) and a
small JSON record (data position, seed, the state's fingerprint). Because the data order
is a function of (seed, step) and every random draw of the step is `fold_in(rng, step)`, a
resumed run continues exactly as if it had never stopped.

`save` returns once orbax has copied the arrays to host memory (the next step may then
donate them); the files are written by a background thread. The next `save`, `wait`,
`restore_latest` and `close` first wait for that write, so at most one save is in flight.

Faults:
- Orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it to `<step>` once
  complete, so a process killed during a save (SIGKILL included) leaves the earlier steps
  untouched and an unfinished temporary directory, which the next start removes.
- No file is read back to check a save. Instead the JSON record holds a fingerprint of
  every state array (`fingerprint`: a position-weighted sum of its bits, computed on the
  devices that hold it), and a restored state must reproduce it. A step that fails to
  restore (a file truncated or missing) or restores other values (flipped bytes) is moved
  to `<directory>-damaged/` with a warning naming it, and the newest intact step is used
  instead. Not detected: damage that leaves every restored value's bits as they were
  (bytes no array is read from) or a collision of the 32-bit sums (about 2**-32 per
  damaged array).
- A save that fails (a full disk, an unwritable directory) is reported when it is waited
  for: logged and counted in `failed_saves`; its temporary files are removed and earlier
  checkpoints are not touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

FINGERPRINT = "fingerprint"  # the key of the state's fingerprint in the JSON record
_TMP_MARK = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
  """No checkpoint in the directory can be restored."""


def _leaf_fingerprint(x):
  """sum_i bits_i * (2 i + 1) mod 2**32 over the flat index i of the array's 32-bit words.

  Any change of one word changes the sum (the weight is odd), and so does a swap of
  two different words (their weights differ).
  """
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  size = x.dtype.itemsize
  words = jax.lax.bitcast_convert_type(
      x, jnp.uint32 if size >= 4 else jnp.dtype(f"uint{8 * size}")).astype(jnp.uint32)
  index = jnp.zeros(words.shape, jnp.uint32)  # the flat index, wrapping at 2**32
  stride = 1
  for dim in reversed(range(words.ndim)):
    index += jax.lax.broadcasted_iota(jnp.uint32, words.shape, dim) * np.uint32(stride)
    stride = (stride * words.shape[dim]) % (1 << 32)
  return jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)


_fingerprints = jax.jit(lambda tree: jax.tree.map(_leaf_fingerprint, tree))


def fingerprint(state) -> dict:
  """{array path: fingerprint} of a pytree of (possibly sharded, multi-process) arrays."""
  sums = _fingerprints(state)
  return {jax.tree_util.keystr(path): int(np.asarray(value.addressable_data(0)))
          for path, value in jax.tree_util.tree_flatten_with_path(sums)[0]}


def fingerprint_mismatch(state, expected: dict) -> str | None:
  """Which arrays of `state` differ from the `expected` fingerprint; None if none do."""
  actual = fingerprint(state)
  if actual.keys() != expected.keys():
    return (f"the state has arrays {sorted(actual)[:3]}..., the checkpoint's record "
            f"{sorted(expected)[:3]}...")
  differ = sorted(k for k in actual if actual[k] != expected[k])
  if differ:
    return (f"{len(differ)} restored array(s) differ from the fingerprint written at save "
            f"time (corrupted): {differ[:3]}")
  return None


def _remove_tree(path: str, timeout_s: float = 5.0) -> None:
  """Removes `path`, retrying while files still appear in it (a failed save's writer
  threads may still be finishing when the failure is reported); logs what is left."""
  deadline = time.monotonic() + timeout_s
  while True:
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.exists(path):
      return
    if time.monotonic() > deadline:
      logging.warning("Could not remove %s, left by a failed save.", path)
      return
    time.sleep(0.05)


class Checkpointer:
  """Saves every `every` steps (and on demand), keeps the last `keep`."""

  def __init__(self, directory: str, *, every: int, keep: int = 3):
    self.every = every
    self.directory = os.path.abspath(directory)
    self.failed_saves = 0
    self._in_flight = None  # the step being written in the background
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             cleanup_tmp_directories=True,
                                             enable_async_checkpointing=True),
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
    """Starts writing the state at `step`; returns once its arrays are in host memory.

    The save in flight, if any, is finished first (`wait`). Returns False (logged,
    counted in `failed_saves`) if the save could not be started; a failure while the
    files are written is reported by the next `wait`. Earlier checkpoints are kept
    either way.
    """
    self.wait()
    if step in self._manager.all_steps():
      return True
    try:
      record = dict(meta, **{FINGERPRINT: fingerprint(state)})
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(record)), force=True)
    except Exception as exc:  # pylint: disable=broad-except  # Reported; training goes on.
      self._failed(step, exc)
      return False
    self._in_flight = step
    return True

  def wait(self) -> bool:
    """Blocks until the save in flight (if any) is committed; False if it failed (logged,
    counted in `failed_saves`, its temporary files removed)."""
    step, self._in_flight = self._in_flight, None
    if step is None:
      return True
    try:
      self._manager.wait_until_finished()
      return True
    except Exception as exc:  # pylint: disable=broad-except  # Reported; training goes on.
      self._failed(step, exc)
      return False

  def _failed(self, step: int, exc: Exception) -> None:
    self.failed_saves += 1
    for name in os.listdir(self.directory):  # what the failed save left
      if name.startswith(f"{step}{_TMP_MARK}"):
        _remove_tree(os.path.join(self.directory, name))
    self._manager.reload()
    logging.error("Saving the checkpoint of step %d in %s failed (%s: %s); the earlier "
                  "checkpoints %s are kept.", step, self.directory, type(exc).__name__,
                  exc, self.all_steps())

  def restore(self, step: int, abstract_state):
    """(state, meta) at `step`; arrays land on the shardings of `abstract_state`.

    Raises CheckpointError if the restored state does not match its fingerprint.
    """
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    meta = dict(restored.meta)
    expected = meta.pop(FINGERPRINT, None)
    problem = None if expected is None else fingerprint_mismatch(restored.state, expected)
    if problem:
      raise CheckpointError(problem)
    return restored.state, meta

  def restore_latest(self, abstract_state):
    """(step, state, meta) of the newest intact checkpoint; None if there is none.

    A damaged step (see the module docstring) is moved to `<directory>-damaged/` with a
    warning and the next older one is tried. Raises CheckpointError if steps exist but
    none of them can be restored.
    """
    self.wait()
    problems = []
    for step in sorted(self.all_steps(), reverse=True):
      step_dir = self.step_dir(step)
      try:
        state, meta = self.restore(step, abstract_state)
        if problems:
          logging.warning("Resuming from step %d, the newest intact checkpoint.", step)
        return step, state, meta
      except Exception as exc:  # pylint: disable=broad-except  # Falls back, logged.
        first_line = (str(exc).strip().splitlines() or [""])[0]
        problem = f"restore failed: {type(exc).__name__}: {first_line[:300]}"
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

  def close(self) -> bool:
    """Finishes the save in flight (False if it failed, as `wait`) and closes orbax."""
    ok = self.wait()
    self._manager.close()
    return ok


def abstract_like(state, shardings):
  """ShapeDtypeStructs carrying the target shardings (restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)
