"""Worker processes of the math verifier: math-verify under a hard wall-clock limit.

Each worker is a Python process in its own process group, with its address space capped where
the platform allows, that answers one JSON request per line: whether any of the request's
(answer, reference) pairs is equivalent by `math_verify_grader`. A request carries its time
limit; the worker interrupts its own comparison at `_SOFT_LIMIT_FRACTION` of it (a SIGALRM timer,
so that it survives to take the next request) and answers {"timeout": true}; a worker still
busy at the full limit (stuck in a C routine, such as a huge integer power) is killed.
`pool()` is the pool of workers of this process.
"""

from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time

_STARTUP_TIMEOUT_S = 60.0
_WORKER_MEMORY_BYTES = 4 << 30
_SOFT_LIMIT_FRACTION = 0.8
MAX_FEEDBACK_CHARS = 500  # Longest error message of a worker reply, and of a Result's feedback.


class _Interrupted(BaseException):
  """Raised by the worker's timer; a BaseException so that math-verify's handlers let it pass."""


def _interrupt(signum, frame):
  del signum, frame
  raise _Interrupted()


def _grader():
  """math-verify's grader, imported in the worker only: the trainer that starts workers
  never loads sympy or math-verify (about 0.3 s and their memory in every process)."""
  from mopd_jax.verifiers import math_verify_grader  # pylint: disable=import-outside-toplevel
  return math_verify_grader


def _reply(line: bytes) -> dict:
  """The reply to one request {"pairs": [[answer, reference], ...], "time_limit_s": t}.

  {"equal": bool} (whether any pair is equivalent), {"timeout": true} when the soft limit
  interrupted the comparison, or {"error": message} for a malformed request.
  """
  try:
    request = json.loads(line)
    pairs = [(str(a), str(r)) for a, r in request["pairs"]]
    soft_limit_s = _SOFT_LIMIT_FRACTION * float(request["time_limit_s"])
  except (ValueError, KeyError, TypeError) as exc:
    return {"error": f"bad request: {type(exc).__name__}: {exc}"[:MAX_FEEDBACK_CHARS]}
  try:
    try:  # The timer is cleared in `finally`; if it fires there, the outer handler answers.
      signal.setitimer(signal.ITIMER_REAL, soft_limit_s)
      equal = any(_grader().equivalent(a, r) for a, r in pairs)
    finally:
      signal.setitimer(signal.ITIMER_REAL, 0)
  except _Interrupted:
    return {"timeout": True}
  return {"equal": equal}


def _serve() -> None:
  """Worker main loop: one JSON request per stdin line, one JSON reply (`_reply`) per line."""
  channel = os.fdopen(os.dup(1), "wb")
  os.dup2(2, 1)
  sys.stdout = sys.stderr
  try:
    import resource  # pylint: disable=import-outside-toplevel

    resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY_BYTES, _WORKER_MEMORY_BYTES))
  except (ImportError, ValueError, OSError):
    pass
  signal.signal(signal.SIGALRM, _interrupt)
  _grader().equivalent("1", "1")  # Loads the parser before the first timed request.
  channel.write(b"ready\n")
  channel.flush()
  for line in sys.stdin.buffer:
    channel.write(json.dumps(_reply(line)).encode("utf-8") + b"\n")
    channel.flush()


class _Worker:
  """One worker process running `_serve`, in its own process group."""

  def __init__(self):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    self._process = subprocess.Popen(
        [sys.executable, "-c", "from mopd_jax.verifiers.math_worker import _serve; _serve()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=root,
        start_new_session=True,
    )
    self._buffer = b""
    try:
      ready = self._read_line(time.monotonic() + _STARTUP_TIMEOUT_S)
    except BaseException:
      self.kill()
      raise
    if ready != b"ready":
      self.kill()
      raise RuntimeError(f"Math worker did not start within {_STARTUP_TIMEOUT_S} s.")

  def alive(self) -> bool:
    return self._process.poll() is None

  def request(self, message: dict, timeout_s: float) -> dict | None:
    """The worker's reply to `message`, or None if none came within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    self._process.stdin.write(json.dumps(message).encode("utf-8") + b"\n")
    self._process.stdin.flush()
    line = self._read_line(deadline)
    return None if line is None else json.loads(line)

  def _read_line(self, deadline: float) -> bytes | None:
    """The next line from the worker, or None at the deadline."""
    descriptor = self._process.stdout.fileno()
    with selectors.DefaultSelector() as selector:
      selector.register(descriptor, selectors.EVENT_READ)
      while b"\n" not in self._buffer:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
          return None
        if not selector.select(remaining):
          continue
        chunk = os.read(descriptor, 1 << 16)
        if not chunk:
          raise RuntimeError(f"Math worker exited unexpectedly ({self._process.poll()}).")
        self._buffer += chunk
    line, _, self._buffer = self._buffer.partition(b"\n")
    return line

  def kill(self) -> None:
    """Kills the worker's process group and reaps it."""
    try:
      os.killpg(self._process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
      pass
    self._process.wait()
    for stream in (self._process.stdin, self._process.stdout):
      try:
        stream.close()
      except OSError:
        pass


class _WorkerPool:
  """At most `size` workers, started on demand; a worker that times out is killed."""

  def __init__(self, size: int):
    self.pid = os.getpid()
    self._slots = threading.BoundedSemaphore(size)
    self._lock = threading.Lock()
    self._idle: list[_Worker] = []
    self._workers: set[_Worker] = set()

  def _take(self) -> _Worker:
    with self._lock:
      while self._idle:
        worker = self._idle.pop()
        if worker.alive():
          return worker
        self._workers.discard(worker)
        worker.kill()
    worker = _Worker()
    with self._lock:
      self._workers.add(worker)
    return worker

  def _discard(self, worker: _Worker) -> None:
    with self._lock:
      self._workers.discard(worker)
    worker.kill()

  def run(self, pairs: list[tuple[str, str]], time_limit_s: float) -> dict | None:
    """A worker's reply (`_reply`) for `pairs`, or None if it gave none within `time_limit_s`."""
    message = {"pairs": pairs, "time_limit_s": time_limit_s}
    with self._slots:
      worker = self._take()
      try:
        reply = worker.request(message, time_limit_s)
      except BaseException:
        self._discard(worker)
        raise
      if reply is None:
        self._discard(worker)
        return None
      with self._lock:
        self._idle.append(worker)
      return reply

  def close(self) -> None:
    """Kills every worker."""
    with self._lock:
      workers, self._workers, self._idle = list(self._workers), set(), []
    for worker in workers:
      worker.kill()


_POOL: _WorkerPool | None = None
_POOL_LOCK = threading.Lock()


def pool() -> _WorkerPool:
  """The worker pool of this process (a forked child gets its own)."""
  global _POOL  # pylint: disable=global-statement
  with _POOL_LOCK:
    if _POOL is None or _POOL.pid != os.getpid():
      _POOL = _WorkerPool(max(1, min(os.cpu_count() or 1, 8)))
    return _POOL


@atexit.register
def _close_pool() -> None:
  if _POOL is not None and _POOL.pid == os.getpid():
    _POOL.close()
