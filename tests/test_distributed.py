"""Multi-process start-up: what `auto` detects, and bad input that must stop every
process quickly with a message naming the setting (real processes on 127.0.0.1)."""

import os
import socket
import subprocess
import sys
import time

import pytest

from mopd_jax import distributed, settings
from tests import conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ds(**kw):
  return settings.DistributedSettings(**kw)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_plan_auto_reads_kubernetes_style_variables():
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4",
         "JAX_PROCESS_ID": "3"}
  assert distributed.plan(_ds(), env) == distributed.Plan("environment", "10.0.0.2:1234",
                                                          4, 3)
  env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
         "JOB_COMPLETION_INDEX": "1"}
  assert distributed.plan(_ds(), env).process_id == 1
  with pytest.raises(distributed.StartupError, match="JAX_NUM_PROCESSES"):
    distributed.plan(_ds(), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "0"})
  with pytest.raises(distributed.StartupError, match="JAX_PROCESS_ID=2 must be below"):
    distributed.plan(_ds(), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                             "JAX_PROCESS_ID": "2"})
  # 'off' ignores the environment.
  assert distributed.plan(_ds(mode="off"), env) is None


def test_plan_auto_slurm_only_with_several_tasks():
  env = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "1"}
  assert distributed.plan(_ds(), env) == distributed.Plan("slurm")
  # One task: nothing to coordinate.
  assert distributed.plan(_ds(), {**env, "SLURM_NTASKS": "1"}) != distributed.Plan("slurm")
  assert distributed.plan(_ds(), {"TPU_WORKER_HOSTNAMES": "a,b"}) == distributed.Plan("tpu")


def test_explicit_mode_needs_all_three_keys():
  p = distributed.plan(_ds(mode="explicit", coordinator_address="127.0.0.1:5",
                           num_processes=2, process_id=1), {})
  assert p == distributed.Plan("config", "127.0.0.1:5", 2, 1)
  with pytest.raises(settings.ConfigError, match=r"config\.distributed\.process_id"):
    _ds(mode="explicit", coordinator_address="127.0.0.1:5", num_processes=2)
  with pytest.raises(settings.ConfigError, match=r"process_id = 2: must be below"):
    _ds(mode="explicit", coordinator_address="127.0.0.1:5", num_processes=2, process_id=2)
  with pytest.raises(settings.ConfigError, match=r"coordinator_address = 'nohost'"):
    _ds(mode="explicit", coordinator_address="nohost", num_processes=2, process_id=0)
  with pytest.raises(settings.ConfigError, match=r"only with config\.distributed\.mode"):
    _ds(num_processes=2)


def _main(port, num_processes, process_id, *extra, devices=2):
  """A `mopd_jax.main` process in explicit mode (fails before loading any model)."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("JAX_") or k in conftest.CACHE_VARIABLES}
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + f" --xla_force_host_platform_device_count={devices}")
  flags = ["--config.distributed.mode=explicit",
           f"--config.distributed.coordinator_address=127.0.0.1:{port}",
           f"--config.distributed.num_processes={num_processes}",
           f"--config.distributed.process_id={process_id}",
           "--config.distributed.initialization_timeout_s=8"]
  return subprocess.Popen(
      [sys.executable, "-m", "mopd_jax.main", "--config=configs/code.py",
       "--workdir=unused_workdir", *flags, *extra], cwd=ROOT, env=env,
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=90):
  """(exit status, stderr, seconds) of a process that must end within `timeout`."""
  start = time.time()
  _, err = proc.communicate(timeout=timeout)
  return proc.returncode, err, time.time() - start


@pytest.mark.slow
def test_unreachable_coordinator_is_named_within_the_timeout():
  proc = _main(_free_port(), 2, 1)
  code, err, _ = _finish(proc)
  assert code != 0
  assert "cannot reach the coordinator at config.distributed.coordinator_address" in err
  assert "within 8 s" in err


@pytest.mark.slow
def test_mismatched_process_counts_stop_both_processes():
  port = _free_port()
  procs = [_main(port, 2, 0), _main(port, 3, 1)]
  results = [_finish(p) for p in procs]
  for code, err, _ in results:
    assert code != 0
    assert "process 1 has config.distributed.num_processes = 3, process 0 has 2" in err


@pytest.mark.slow
def test_missing_process_is_named_within_the_timeout():
  code, err, _ = _finish(_main(_free_port(), 3, 0))
  assert code != 0
  assert "only 1 of config.distributed.num_processes = 3 processes joined" in err
  assert "missing process ids [1, 2]" in err


@pytest.mark.slow
def test_mesh_that_does_not_match_the_devices_stops_every_process():
  port = _free_port()
  procs = [_main(port, 2, i, "--config.mesh.shape=(3,1,1)") for i in range(2)]
  for code, err, _ in (_finish(p) for p in procs):
    assert code != 0
    assert "config.mesh.shape = (3, 1, 1)" in err
    assert "does not fit the 4 devices of 2 process(es)" in err
