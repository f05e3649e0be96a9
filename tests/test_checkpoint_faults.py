"""Checkpoints under faults: SIGKILL during a save, damaged latest steps, a full disk.

A small deterministic loop (a jitted update of a 1M-float state with its own PRNG key,
saved every step) stands in for training: "nothing lost" means the final state of an
interrupted and resumed loop equals, bit for bit, that of an uninterrupted one.
"""

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopd_jax import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 5

# argv: checkpoint directory, output .npy, kill point ("" = none). Kill points stop the
# process with SIGKILL at a chosen moment of the save of step 3 (orbax commits it in its
# background thread while the loop computes step 4).
LOOP = """
import os, signal, sys
import jax, jax.numpy as jnp, numpy as np
from orbax.checkpoint._src.path import atomicity
from mopd_jax import checkpointing

directory, out, kill_at = sys.argv[1], sys.argv[2], sys.argv[3]
ckpt = checkpointing.Checkpointer(directory, every=1, keep=2)
state = {"w": jnp.zeros((1 << 20,), jnp.float32), "key": jax.random.PRNGKey(0)}
resumed = ckpt.restore_latest(jax.eval_shape(lambda: state))
start = 0 if resumed is None else resumed[0]
if resumed is not None:
  state = resumed[1]

def die(point):
  if kill_at == point:
    os.kill(os.getpid(), signal.SIGKILL)

finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def killing_finalize(self):  # Items are committed inside the step; the step last.
  is_step = self.get_final().name == "3"
  if is_step:
    die("before_commit")
  await finalize(self)
  if is_step:
    die("after_commit")
atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize

@jax.jit
def update(state):
  key, sub = jax.random.split(state["key"])
  return {"w": state["w"] * 0.9 + jax.random.normal(sub, state["w"].shape), "key": key}

for step in range(start, %d):
  state = update(state)
  assert ckpt.save(step + 1, state, {"data_position": step + 1})
assert ckpt.close()
np.save(out, np.asarray(state["w"]))
print("resumed from", start)
""" % TOTAL


def _loop(directory, out, kill_at=""):
  return subprocess.run([sys.executable, "-c", LOOP, directory, out, kill_at], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  directory = tmp_path_factory.mktemp("uninterrupted")
  proc = _loop(str(directory / "ckpt"), str(directory / "final.npy"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return np.load(directory / "final.npy")


@pytest.mark.slow
@pytest.mark.parametrize("kill_at,resume_step", [
    ("before_commit", 2),     # Step 3 is a temporary directory: resume from 2.
    ("after_commit", 3),      # Committed: resume from 3.
])
def test_sigkill_during_save_then_resume_is_identical(tmp_path, uninterrupted, kill_at,
                                                      resume_step):
  directory, out = str(tmp_path / "ckpt"), str(tmp_path / "final.npy")
  killed = _loop(directory, out, kill_at)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert not os.path.exists(out)
  resumed = _loop(directory, out)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from {resume_step}" in resumed.stdout
  np.testing.assert_array_equal(np.load(out), uninterrupted)
  assert not [name for name in os.listdir(directory) if not name.isdigit()]


@pytest.mark.slow
def test_sigkill_at_random_moments_of_saves(tmp_path, uninterrupted):
  """Kills while the loop is saving, at spread-out delays; every resume is identical."""
  for attempt, delay in enumerate((0.0, 0.02, 0.05, 0.1)):
    directory, out = str(tmp_path / f"ckpt{attempt}"), str(tmp_path / f"final{attempt}.npy")
    proc = subprocess.Popen([sys.executable, "-c", LOOP, directory, out, ""], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not any(name.startswith("3") for name in _listdir(directory)):
      assert proc.poll() is None, "the loop ended before step 3 was being saved"
      time.sleep(0.002)
    time.sleep(delay)
    proc.kill()
    proc.wait()
    resumed = _loop(directory, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    np.testing.assert_array_equal(np.load(out), uninterrupted)


def _listdir(directory):
  try:
    return os.listdir(directory)
  except FileNotFoundError:
    return []


def _state(value):
  w = jax.random.normal(jax.random.PRNGKey(value), (256, 1024))  # Incompressible.
  return {"w": w, "n": jnp.asarray(value, jnp.int32)}


ABSTRACT = jax.eval_shape(lambda: _state(0))


def _saved(directory, steps, keep=5):
  ckpt = checkpointing.Checkpointer(str(directory), every=1, keep=keep)
  for step in steps:
    assert ckpt.save(step, _state(step), {"data_position": step})
  assert ckpt.wait()
  return ckpt


def _largest_file(step_dir):
  files = [os.path.join(parent, name) for parent, _, names in os.walk(step_dir)
           for name in names]
  return max(files, key=os.path.getsize)


def test_fingerprint_matches_a_numpy_reference():
  """sum_i word_i * (2 i + 1) mod 2**32 over each array's 32-bit (or narrower) words."""
  rng = np.random.default_rng(0)
  tree = {"f32": rng.normal(size=(3, 5, 7)).astype(np.float32),
          "bf16": jnp.asarray(rng.normal(size=(4, 9)), jnp.bfloat16),
          "i32": rng.integers(-2**31, 2**31, size=(6,), dtype=np.int32),
          "mask": rng.random((5, 3)) < 0.5,
          "key": jax.random.PRNGKey(7), "scalar": np.float32(-2.5)}

  def reference(x):
    x = np.asarray(x)
    words = x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).ravel()
    weights = 2 * np.arange(words.size, dtype=np.uint64) + 1
    return int((words.astype(np.uint64) * weights).sum() % (1 << 32))

  got = checkpointing.fingerprint(jax.tree.map(jnp.asarray, tree))
  assert got == {f"['{k}']": reference(v) for k, v in tree.items()}
  flipped = np.array(tree["f32"])
  flipped.view(np.uint32)[1, 2, 3] ^= 1 << 20
  assert checkpointing.fingerprint({"f32": jnp.asarray(flipped)})["['f32']"] != got["['f32']"]


def test_save_returns_before_the_files_are_written(tmp_path, monkeypatch):
  """The write goes on in the background: the state may be deleted (as the step donates
  it) right after `save`, and the checkpoint is committed only by `wait`."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=import-outside-toplevel
  release = threading.Event()
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def held_finalize(self):
    release.wait(timeout=60)
    await finalize(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", held_finalize)
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"), every=1)
  state = _state(1)
  assert ckpt.save(1, state, {"data_position": 1})
  jax.tree.map(lambda x: x.delete(), state)
  assert not os.path.exists(ckpt.step_dir(1))  # not committed yet
  release.set()
  assert ckpt.wait() and ckpt.all_steps() == [1]
  step, restored, meta = ckpt.restore_latest(ABSTRACT)
  assert (step, meta) == (1, {"data_position": 1})
  np.testing.assert_array_equal(restored["w"], _state(1)["w"])
  ckpt.close()


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "delete_file"])
def test_damaged_latest_falls_back_to_the_newest_intact(tmp_path, caplog, damage):
  ckpt = _saved(tmp_path / "ckpt", [1, 2, 3])
  victim = _largest_file(ckpt.step_dir(3))
  if damage == "truncate":
    os.truncate(victim, os.path.getsize(victim) // 2)
  elif damage == "flip_byte":
    with open(victim, "r+b") as f:
      f.seek(os.path.getsize(victim) // 2)
      byte = f.read(1)
      f.seek(-1, os.SEEK_CUR)
      f.write(bytes([byte[0] ^ 0xFF]))
  else:
    os.unlink(victim)
  with caplog.at_level(logging.WARNING):
    step, state, meta = ckpt.restore_latest(ABSTRACT)
  assert (step, int(state["n"]), meta["data_position"]) == (2, 2, 2)
  np.testing.assert_array_equal(state["w"], _state(2)["w"])
  assert ckpt.step_dir(3) in caplog.text and "damaged" in caplog.text
  # A flipped byte is either refused by orbax's reader or, where it lands in raw values,
  # restored silently and refused by the fingerprint (forced in the test below).
  assert ckpt.all_steps() == [1, 2]
  assert os.listdir(str(tmp_path / "ckpt") + "-damaged")[0].startswith("3-")
  assert ckpt.save(3, _state(3), {"data_position": 3})  # The step can be saved again.
  assert ckpt.restore_latest(ABSTRACT)[0] == 3
  ckpt.close()


def test_values_restored_wrong_are_refused_by_the_fingerprint(tmp_path, caplog):
  """orbax hands back step 3 with one value changed (as a flipped bit in a raw chunk
  does, silently): the fingerprint refuses it and step 2 is restored."""
  ckpt = _saved(tmp_path / "ckpt", [1, 2, 3])
  real_restore = ckpt._manager.restore  # pylint: disable=protected-access

  def restore_with_one_value_changed(step, *args, **kwargs):
    out = real_restore(step, *args, **kwargs)
    if step == 3:
      out.state["w"] = out.state["w"].at[17, 5].add(1e-3)
    return out

  ckpt._manager.restore = restore_with_one_value_changed  # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING):
    step, state, _ = ckpt.restore_latest(ABSTRACT)
  assert step == 2 and int(state["n"]) == 2
  assert ckpt.step_dir(3) in caplog.text and "differ from the fingerprint" in caplog.text
  ckpt.close()


def test_no_intact_checkpoint_is_an_error_naming_them(tmp_path):
  ckpt = _saved(tmp_path / "ckpt", [1, 2])
  for step in (1, 2):
    os.truncate(_largest_file(ckpt.step_dir(step)), 10)
  with pytest.raises(checkpointing.CheckpointError, match=r"ckpt/2: .*ckpt/1: "):
    ckpt.restore_latest(ABSTRACT)
  assert ckpt.restore_latest(ABSTRACT) is None  # Both were set aside.
  ckpt.close()


def test_failed_save_is_reported_and_keeps_earlier_checkpoints(tmp_path, caplog, monkeypatch):
  """A write error in the background part of a save (as a full disk gives) is logged when
  the save is waited for, not raised; the next save works."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=import-outside-toplevel
  ckpt = _saved(tmp_path / "ckpt", [1, 2])
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def disk_full(self):
    raise OSError(28, "No space left on device", str(self.get_final()))

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)
  assert ckpt.save(3, _state(3), {"data_position": 3})  # started
  with caplog.at_level(logging.ERROR):
    assert not ckpt.wait()
  assert "step 3" in caplog.text and "No space left" in caplog.text
  assert ckpt.failed_saves == 1 and ckpt.all_steps() == [1, 2]
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["1", "2"]
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
  assert ckpt.save(3, _state(3), {"data_position": 3}) and ckpt.wait()
  assert ckpt.restore_latest(ABSTRACT)[0] == 3
  ckpt.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a small tmpfs")
def test_full_disk_at_save_time(tmp_path, caplog):
  """A real ENOSPC: a 2.5 MiB tmpfs holds two 1 MiB checkpoints but not a third."""
  mount = tmp_path / "small"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(mount)],
                    check=False, capture_output=True).returncode != 0:
    pytest.skip("cannot mount a tmpfs here")
  try:
    ckpt = _saved(mount / "ckpt", [1, 2])
    with caplog.at_level(logging.ERROR):
      ckpt.save(3, _state(3), {"data_position": 3})  # fails now or when waited for
      assert not ckpt.wait() or ckpt.failed_saves == 1
    assert "step 3" in caplog.text
    assert ckpt.failed_saves == 1 and ckpt.all_steps() == [1, 2]
    assert sorted(os.listdir(mount / "ckpt")) == ["1", "2"]
    for step in (1, 2):
      state, _ = ckpt.restore(step, ABSTRACT)
      np.testing.assert_array_equal(state["w"], _state(step)["w"])
    step, state, _ = ckpt.restore_latest(ABSTRACT)
    assert step == 2 and int(state["n"]) == 2
    ckpt.close()
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_training_killed_during_a_checkpoint_write_resumes_identically(tiny_base_dir, tmp_path,
                                                                     uninterrupted_run):
  """The trainer itself: SIGKILL while orbax writes a step, then resume; same metrics."""
  from tests import test_resume  # pylint: disable=import-outside-toplevel
  reference = uninterrupted_run
  workdir = str(tmp_path / "killed")
  proc = test_resume._start(tiny_base_dir, workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  while not any("orbax-checkpoint-tmp" in name and not name.startswith("2")
                for name in _listdir(checkpoints)):
    assert proc.poll() is None, "the run ended before a later checkpoint was being written"
    time.sleep(0.001)
  proc.kill()
  proc.wait(timeout=60)
  test_resume._finish(tiny_base_dir, workdir)
  assert test_resume._comparable(workdir) == test_resume._comparable(reference)
  assert not [name for name in os.listdir(checkpoints) if not name.isdigit()]
