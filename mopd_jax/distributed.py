"""Multi-process start-up: whether, and with what, to call `jax.distributed.initialize`.

`config.distributed.mode`:
  'off'       one process; nothing is initialised.
  'explicit'  coordinator address, process count and process id from the config.
  'auto'      the first of these that the environment describes, else one process:
                JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID (or
                JOB_COMPLETION_INDEX): Kubernetes Jobs / JobSets, `launch/local.sh`;
                SLURM (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS > 1, SLURM_PROCID);
                a Cloud TPU VM (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES /
                MEGASCALE_COORDINATOR_ADDRESS, or TPU devices under /dev).
              On SLURM and TPU, JAX itself reads the coordinator from the environment.

Where the coordinator address is known (config or JAX_* variables), a rendezvous over
plain TCP runs before `jax.distributed.initialize`: process 0 listens on the coordinator
port, every other process reports its process id and process count, and process 0
answers each with "ok" or what does not match. A coordinator that cannot be reached, a
process count that differs between processes, a duplicate or missing process id thus
stop every process with a message that names the setting, within
`initialization_timeout_s`, instead of a hang or a bare deadline error.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import socket
import time
from typing import Mapping

from absl import logging
import jax

from mopd_jax import settings as settings_lib

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_COUNT = "JAX_NUM_PROCESSES"
ENV_ID = "JAX_PROCESS_ID"
ENV_INDEX = "JOB_COMPLETION_INDEX"  # Kubernetes Indexed Job
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")
_TPU_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


class StartupError(RuntimeError):
  """Multi-process start-up failed; the message names the setting involved."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """How to initialise. The address, count and id are None where JAX detects them."""

  source: str  # 'config', 'environment', 'slurm' or 'tpu'
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def name(self, field: str) -> str:
    """The setting a value came from, for error messages."""
    if self.source == "config":
      return f"config.distributed.{field}"
    if self.source == "environment":
      return {"coordinator_address": ENV_ADDRESS, "num_processes": ENV_COUNT,
              "process_id": ENV_ID}[field]
    return f"the {self.source.upper()} environment's {field}"


def _env_int(environ, name) -> int:
  value = environ[name]
  if not value.strip().isdigit():
    raise StartupError(f"Environment variable {name}={value!r} must be a non-negative "
                       "integer.")
  return int(value)


def plan(ds: settings_lib.DistributedSettings,
         environ: Mapping[str, str] = os.environ) -> Plan | None:
  """The initialisation `ds` and the environment ask for; None: stay single-process."""
  if ds.mode == "off":
    return None
  if ds.mode == "explicit":
    return Plan("config", ds.coordinator_address, ds.num_processes, ds.process_id)
  if ENV_ADDRESS in environ:
    id_var = ENV_ID if ENV_ID in environ else ENV_INDEX
    missing = [v for v in (ENV_COUNT, id_var) if v not in environ]
    if missing:
      raise StartupError(f"{ENV_ADDRESS}={environ[ENV_ADDRESS]!r} is set but {missing} "
                         f"are not: set {ENV_COUNT} and {ENV_ID} (or {ENV_INDEX}), or "
                         "run with --config.distributed.mode=off.")
    count, pid = _env_int(environ, ENV_COUNT), _env_int(environ, id_var)
    if not 0 <= pid < count:
      raise StartupError(f"{id_var}={pid} must be below {ENV_COUNT}={count}.")
    return Plan("environment", environ[ENV_ADDRESS], count, pid)
  if all(v in environ for v in _SLURM) and _env_int(environ, "SLURM_NTASKS") > 1:
    return Plan("slurm")
  if any(v in environ for v in _TPU_ENV) or glob.glob("/dev/accel[0-9]*") or glob.glob(
      "/dev/vfio/[0-9]*"):
    return Plan("tpu")
  return None


def initialize(ds: settings_lib.DistributedSettings,
               environ: Mapping[str, str] = os.environ) -> Plan | None:
  """Initialises jax.distributed as `plan` says (before any device is used)."""
  p = plan(ds, environ)
  if p is None or jax.distributed.is_initialized():
    return p
  timeout = ds.initialization_timeout_s
  if p.coordinator_address is not None:
    logging.info("Process %d of %d: rendezvous at %s (%s).", p.process_id, p.num_processes,
                 p.coordinator_address, p.name("coordinator_address"))
    rendezvous(p, timeout)
  jax.distributed.initialize(
      coordinator_address=p.coordinator_address, num_processes=p.num_processes,
      process_id=p.process_id, initialization_timeout=timeout,
      heartbeat_timeout_seconds=ds.heartbeat_timeout_s)
  if p.num_processes is not None and (jax.process_count(), jax.process_index()) != (
      p.num_processes, p.process_id):
    raise StartupError(
        f"JAX reports process {jax.process_index()} of {jax.process_count()}, but "
        f"{p.name('process_id')} = {p.process_id} and {p.name('num_processes')} = "
        f"{p.num_processes}.")
  return p


def log_startup(p: Plan | None):
  """One line per process: its index, the process count and its local devices."""
  devices = jax.local_devices()
  logging.info("Process %d of %d (%s): %d local devices %s.", jax.process_index(),
               jax.process_count(), "single process" if p is None else p.source,
               len(devices), [str(d) for d in devices])


def is_primary() -> bool:
  """Process 0 alone writes metrics, summaries and the config."""
  return jax.process_index() == 0


# ------------------------------------------------------------------ Rendezvous.

def rendezvous(p: Plan, timeout_s: float):
  """Checks, over TCP at the coordinator address, that every process agrees on the
  process count and holds a distinct id; raises StartupError otherwise."""
  host, port = p.coordinator_address.rsplit(":", 1)
  deadline = time.monotonic() + timeout_s
  if p.process_id == 0:
    _serve(p, int(port), deadline, timeout_s)
  else:
    _join(p, host, int(port), deadline, timeout_s)


def _send(conn, obj):
  conn.sendall(json.dumps(obj).encode() + b"\n")


def _receive(conn) -> dict:
  with conn.makefile("r", encoding="utf-8") as f:
    line = f.readline()
  if not line:
    raise OSError("connection closed")
  return json.loads(line)


def _serve(p: Plan, port: int, deadline: float, timeout_s: float):
  count_name = p.name("num_processes")
  try:
    server = socket.create_server(("", port))
  except OSError as e:
    raise StartupError(f"Process 0 cannot listen on {p.name('coordinator_address')} = "
                       f"{p.coordinator_address!r}: {e}.") from e
  peers, problems = {}, []
  with server:
    while len(peers) < p.num_processes - 1 and not problems:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        break
      server.settimeout(remaining)
      try:
        conn, _ = server.accept()
      except OSError:
        continue
      try:
        conn.settimeout(max(remaining, 1.0))
        hello = _receive(conn)
        pid, count = int(hello["process_id"]), int(hello["num_processes"])
      except (OSError, ValueError, KeyError, TypeError):
        conn.close()  # not one of our processes
        continue
      if count != p.num_processes:
        problems.append(f"process {pid} has {count_name} = {count}, process 0 has "
                        f"{p.num_processes}")
      elif pid in peers or not 0 < pid < p.num_processes:
        problems.append(f"{p.name('process_id')} = {pid} is "
                        + ("used twice" if pid in peers else
                           f"not in 1..{p.num_processes - 1}"))
      peers.setdefault(pid, []).append(conn)
    if not problems and len(peers) < p.num_processes - 1:
      missing = sorted(set(range(1, p.num_processes)) - set(peers))
      problems.append(f"only {len(peers) + 1} of {count_name} = {p.num_processes} "
                      f"processes joined within {timeout_s:g} s "
                      f"(config.distributed.initialization_timeout_s); missing process "
                      f"ids {missing}")
    for conns in peers.values():
      for conn in conns:
        try:
          _send(conn, {"error": "; ".join(problems) or None})
          conn.recv(1)  # the peer closes first, so the port is free for JAX's service
        except OSError:
          pass
        conn.close()
  if problems:
    raise StartupError("Multi-process start-up failed: " + "; ".join(problems) + ".")


def _join(p: Plan, host: str, port: int, deadline: float, timeout_s: float):
  address_name = p.name("coordinator_address")
  while True:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      raise StartupError(
          f"Process {p.process_id} cannot reach the coordinator at {address_name} = "
          f"{p.coordinator_address!r} within {timeout_s:g} s "
          "(config.distributed.initialization_timeout_s): is process 0 running, and is "
          "the address reachable from this host?")
    try:
      conn = socket.create_connection((host, port), timeout=min(remaining, 5.0))
      break
    except OSError:
      time.sleep(min(0.2, max(remaining, 0.0)))
  with conn:
    conn.settimeout(max(deadline - time.monotonic(), 1.0))
    try:
      _send(conn, {"process_id": p.process_id, "num_processes": p.num_processes})
      reply = _receive(conn)
    except (OSError, ValueError) as e:
      raise StartupError(
          f"Process {p.process_id}: no answer from the coordinator at {address_name} = "
          f"{p.coordinator_address!r} within {timeout_s:g} s "
          f"(config.distributed.initialization_timeout_s); is {p.name('num_processes')} "
          f"= {p.num_processes} the same for every process?") from e
  if reply["error"]:
    raise StartupError(f"Multi-process start-up failed: {reply['error']}.")
