"""Shared fixtures: tiny models and a tiny demo base model built once per session."""

import dataclasses
import os
import pathlib
import shutil

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The suite runs on CPU: with libtpu installed (a test extra, for the TPU compile tests),
# JAX would otherwise probe for TPU hardware in every process, slowly and noisily.
# Compiling for a TPU topology works under JAX_PLATFORMS=cpu.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# libtpu lets one process at a time describe a topology (a lock file); the TPU compile
# tests compile ahead of time, on no device, and may run in both xdist workers at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# A persistent compilation cache, set before JAX is imported so that every test process
# and every child process it starts (resume, multi-host, faults, the demo) shares it:
# the same tiny steps are compiled once per suite run instead of once per process.
# Kept between runs in pytest's cache folder; MOPD_JAX_TEST_COMPILE_CACHE overrides it.
_CACHE = os.environ.get("MOPD_JAX_TEST_COMPILE_CACHE") or str(
    pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax_compilation_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# What a test that starts processes with a cleaned environment passes on.
CACHE_VARIABLES = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
# The tests' programs are tiny and compiled far more often than they run; XLA's CPU
# backend at optimization level 0 compiles them about a third faster (its HLO passes
# still run; only the LLVM code generation is less optimized). A step with a host
# callback (the fused train step) never enters the persistent cache, so every process
# that runs one compiles it again. MOPD_JAX_TEST_XLA_OPT=1 keeps XLA's default level.
if os.environ.get("MOPD_JAX_TEST_XLA_OPT", "0") != "1":
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
  """A demo base model with a short pretraining recipe (same code path as the demo).

  Built once per test run: under pytest-xdist the workers share one copy, built by the
  first worker that gets here while the others wait on a file lock.
  """
  from filelock import FileLock  # pylint: disable=import-outside-toplevel
  from mopd_jax import demo_base  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # shared by the workers of this run
  directory = root / "tiny_demo_base"
  recipe = dataclasses.replace(demo_base.BaseRecipe(), steps=40, embed_dim=48,
                               head_dim=12, mlp_dim=96)
  with FileLock(str(root / "tiny_demo_base.lock")):
    demo_base.ensure(str(directory), recipe)
  return str(directory)


def built_once(tmp_path_factory, name: str, build) -> str:
  """The directory `name` made by `build(path)` once per test run: under pytest-xdist the
  workers share it (the first builds it under a file lock, the others wait for it), so a
  fixture that starts training runs is not run again on each worker that needs it. A
  build that raised is tried again by the next test that needs it."""
  from filelock import FileLock  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # shared by the workers of this run
  directory, done = root / name, root / f"{name}.done"
  with FileLock(str(root / f"{name}.lock")):
    if not done.exists():
      shutil.rmtree(directory, ignore_errors=True)
      directory.mkdir()
      build(str(directory))
      done.touch()
  return str(directory)


@pytest.fixture(scope="session")
def uninterrupted_run(tiny_base_dir, tmp_path_factory):
  """The workdir of `tests/test_resume.py`'s run, uninterrupted: the reference of the
  resume and fault tests, run once per test run (the xdist workers share it)."""
  from tests import test_resume  # pylint: disable=import-outside-toplevel
  return built_once(tmp_path_factory, "uninterrupted_run",
                    lambda path: test_resume._finish(tiny_base_dir, path))  # pylint: disable=protected-access


def load_config(name="code", arg=None, **overrides):
  """get_config(arg) of configs/<name>.py with dotted-key overrides."""
  from benchmarks import configs  # pylint: disable=import-outside-toplevel
  return configs.load_config(name, arg, **overrides)


def tiny_config(base_dir, **overrides):
  """A small, fast run config on the tiny base model."""
  settings = {
      "model.cache_dir": base_dir, "data.batch_size": 4, "sampling.num_samples": 4,
      "sampling.max_response_len": 28, "peers.peer_cap": 28, "eval.num_prompts": 8,
      "eval.num_samples": 2, "total_steps": 3, "checkpoint_every": 0, "eval_every": 0,
      "loss.chunk_size": 8,
  }
  settings.update(overrides)
  return load_config(**settings)


def sampled_rollouts(s, state, batch):
  """(Rollouts, peer key) of one step's sampling and host verification, as the step
  makes them, for tests that call the step's stages one by one."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from mopd_jax import train_step  # pylint: disable=import-outside-toplevel
  sample_key, peer_key = train_step.step_keys(state)
  with jax.set_mesh(s.mesh):  # jitted: the sampler's loops are not run eagerly
    out = jax.device_get(jax.jit(s.step_cfg.sampler.__call__)(
        state.params, batch["prompt_tokens"], batch["prompt_mask"], sample_key))
  ids = np.repeat(batch["example_id"], s.step_cfg.num_samples)
  rewards, status, fb, fbl = s.host_verifier(ids, out.tokens, out.lengths)
  return train_step.Rollouts(tokens=out.tokens, logprobs=out.logprobs, lengths=out.lengths,
                             finished=out.finished, rewards=rewards, status=status,
                             feedback=fb, feedback_lengths=fbl), peer_key


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  """Modules holding `slow` tests (the ones that start processes and run training) first,
  each module kept together (its module-scoped fixtures are built once): on two xdist
  workers the long tests then start early and the run ends on short ones, instead of one
  worker idling while the other finishes a minute-long test."""
  slow_modules = {item.module.__name__ for item in items
                  if item.get_closest_marker("slow") is not None}
  items.sort(key=lambda item: item.module.__name__ not in slow_modules)
