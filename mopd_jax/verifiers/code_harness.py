"""The test harness that the code verifier runs inside the sandbox, as source text.

Kept apart from `verifiers.code`, which builds the payload and grades the report in the
parent: this text is the only part that runs next to the untrusted program, so it is
read on its own. `sandbox.SandboxPool` executes it once per worker; its `run` forks a
fresh process per test, and reports raw results (return values, stdout, errors) as one
JSON document, never a verdict (the comparisons stay in the parent).
"""

# Runs inside the sandbox (executed once per worker; the imports below are preloaded for
# every program). `run` reads the payload, runs each test in a fresh child process and
# writes {"results": [...]} or {"syntax_error": ...} to `report_fd`.
HARNESS = r"""
import bisect, collections, decimal, fractions, functools, heapq, itertools, math, operator
import random, statistics, string, typing
import json, os, re, resource, select, signal, sys, traceback


def _describe(exc):
  return f"{type(exc).__name__}: {exc}"[:500]


def _write_all(fd, data):
  view = memoryview(data)
  while view:
    view = view[os.write(fd, view):]


def _memfd(data=b""):
  fd = os.memfd_create("io")
  _write_all(fd, data)
  os.lseek(fd, 0, os.SEEK_SET)
  return fd


def _read_back(fd, limit):
  os.lseek(fd, 0, os.SEEK_SET)
  chunks, size = [], 0
  while size <= limit:
    chunk = os.read(fd, limit + 1 - size)
    if not chunk:
      break
    chunks.append(chunk)
    size += len(chunk)
  return b"".join(chunks)


def _reap():
  while True:
    try:
      if os.waitpid(-1, os.WNOHANG)[0] == 0:
        return
    except ChildProcessError:
      return


def _fork_test(body, fds, limit_s):
  # Runs body() in a new process group with fds as 0, 1, 2[, 3]; the wait status, or
  # None if it was killed after limit_s seconds.
  pid = os.fork()
  if pid == 0:
    code = 1
    try:
      os.setpgid(0, 0)
      cpu_s = min(int(limit_s) + 1, resource.getrlimit(resource.RLIMIT_CPU)[1])
      resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
      for target, fd in enumerate(fds):
        os.dup2(fd, target)
      os.closerange(len(fds), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
      code = body()
    finally:
      os._exit(code)
  pidfd = os.pidfd_open(pid)
  try:
    finished = select.select([pidfd], [], [], limit_s)[0]
  finally:
    os.close(pidfd)
  if not finished:
    for kill in (os.killpg, os.kill):
      try:
        kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
  status = os.waitpid(pid, 0)[1]
  _reap()
  return status if finished else None


def _exit_error(status, stderr):
  if os.WIFSIGNALED(status):
    number = os.WTERMSIG(status)
    name = signal.Signals(number).name if number in signal.valid_signals() else number
    error = f"killed by signal {name}"
    if number == signal.SIGXCPU:
      error += " (CPU time limit)"
  else:
    error = f"exit status {os.WEXITSTATUS(status)}"
  lines = stderr.decode("utf-8", "replace").strip().splitlines()
  return f"{error}: {lines[-1][:300]}" if lines else error


def _resolve(namespace, fn_name):
  fn = namespace.get(fn_name)
  if callable(fn):
    return fn
  solution = namespace.get("Solution")
  if isinstance(solution, type) and callable(getattr(solution, fn_name, None)):
    return getattr(solution(), fn_name)
  raise NameError(f"function {fn_name!r} is not defined")


def _call_namespace():
  # LeetCode-style programs use typing names (List, Optional) and common modules unimported.
  namespace = {name: getattr(typing, name) for name in typing.__all__}
  for module in (bisect, collections, functools, heapq, itertools, math, operator, random, re,
                 statistics, string):
    namespace[module.__name__] = module
  namespace["__name__"] = "solution"
  return namespace


def _call_test(program, fn_name, args, limit_s, max_bytes):
  def body():
    try:
      namespace = _call_namespace()
      exec(program, namespace)
      fn = _resolve(namespace, fn_name)
      value = fn(**args) if isinstance(args, dict) else fn(*args)
      data = json.dumps({"ok": True, "value": value}).encode("utf-8")
    except BaseException as exc:
      data = json.dumps({"ok": False, "error": _describe(exc)}).encode("utf-8")
    if len(data) > max_bytes:
      data = json.dumps({"ok": False, "error": f"result too large ({len(data)} bytes)"})
      data = data.encode("utf-8")
    _write_all(3, data)
    return 0

  devnull, result = os.open(os.devnull, os.O_RDWR), _memfd()
  try:
    status = _fork_test(body, (devnull, devnull, devnull, result), limit_s)
    if status is None:
      return {"ok": False, "timeout": True, "error": f"time limit exceeded ({limit_s} s)"}
    data = _read_back(result, max_bytes)
    if not data:
      return {"ok": False, "error": "exited before returning: " + _exit_error(status, b"")}
    try:
      document = json.loads(data)
    except (ValueError, RecursionError) as exc:
      return {"ok": False, "error": f"unreadable result: {_describe(exc)}"}
    return document if isinstance(document, dict) else {"ok": False, "error": "bad result"}
  finally:
    os.close(devnull)
    os.close(result)


def _stdio_test(program, text, limit_s, max_bytes):
  def body():
    handles = (open(0, "r", encoding="utf-8", errors="replace", closefd=False),
               open(1, "w", encoding="utf-8", closefd=False),
               open(2, "w", encoding="utf-8", closefd=False))
    sys.stdin, sys.stdout, sys.stderr = handles
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = handles
    code = 0
    try:
      exec(program, {"__name__": "__main__"})
    except SystemExit as exc:
      if exc.code not in (None, 0):
        handles[2].write(f"SystemExit: {exc.code}\n")
        code = 1
    except BaseException:
      traceback.print_exc(file=handles[2])
      code = 1
    for handle in handles[1:]:
      try:
        handle.flush()
      except BaseException:
        pass
    return code

  fds = (_memfd(text.encode("utf-8")), _memfd(), _memfd())
  try:
    status = _fork_test(body, fds, limit_s)
    if status is None:
      return {"ok": False, "timeout": True, "error": f"time limit exceeded ({limit_s} s)"}
    output = _read_back(fds[1], max_bytes)
    if len(output) > max_bytes:
      return {"ok": False, "error": f"output too large (over {max_bytes} bytes)"}
    if status != 0:
      return {"ok": False, "error": _exit_error(status, _read_back(fds[2], 4096))}
    return {"ok": True, "value": output.decode("utf-8", "replace")}
  finally:
    for fd in fds:
      os.close(fd)


def run(payload, report_fd):
  spec = json.loads(payload)
  try:
    program = compile(spec["code"], "<solution>", "exec")
  except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as exc:
    document = {"syntax_error": _describe(exc)}
  else:
    results = []
    for test_input in spec["inputs"]:
      if any(result.get("timeout") for result in results):
        results.append({"ok": False, "error": "not run after a timeout"})
      elif spec["fn_name"] is None:
        results.append(_stdio_test(program, test_input, spec["limit_s"], spec["max_bytes"]))
      else:
        results.append(_call_test(program, spec["fn_name"], test_input, spec["limit_s"],
                                  spec["max_bytes"]))
    document = {"results": results}
  _write_all(report_fd, json.dumps(document).encode("utf-8"))
"""
