"""Hostile programs against the code verifier's sandbox (mopd_jax.verifiers.sandbox).

Every attack must score 0, end within its time budget, leave no process of a sandbox uid
and no file behind, keep canaries and the test process intact, leak no host secret into
the feedback, and leave the next verification working.
"""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import psutil
import pytest

from mopd_jax.verifiers import code, sandbox
from mopd_jax.verifiers.result import Result

LIMIT_S = 0.5  # Problem time limit: each test may run LIMIT_S + 1 s.
BUDGET_S = 2 * (LIMIT_S + 1.0) + 1.0 + 1.0  # Two tests, harness slack, margin.
SECRET = "s3cr3t-" + secrets.token_hex(8)
ANSWERS = [secrets.token_hex(8), secrets.token_hex(8)]
CALL_REF = {"fn_name": "f", "inputs": [[1], [2]], "outputs": ANSWERS}
STDIO_REF = {"inputs": ["1\n", "2\n"], "outputs": ANSWERS}
GOOD = ("def add3(x):\n    return x + 3", {"fn_name": "add3", "inputs": [[1]], "outputs": [4]})
SHARED_TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


class Host:
  """Things on the host that programs try to reach: canaries, keys, answers, a server."""

  def __init__(self):
    self.dir = tempfile.mkdtemp(prefix="mopd-adversarial-")  # root-owned, 0700
    self.canary = os.path.join(self.dir, "canary")
    self.home = os.path.join(self.dir, "home")
    self.ssh_key = os.path.join(self.home, ".ssh", "id_rsa")
    os.makedirs(os.path.dirname(self.ssh_key))
    self._write(self.canary, "canary", 0o644)
    self._write(self.ssh_key, f"-----BEGIN OPENSSH PRIVATE KEY-----\n{SECRET}\n", 0o600)
    # World-readable answers and a world-writable canary: only the private root hides them.
    self.public_dir = tempfile.mkdtemp(prefix="mopd-adversarial-public-")
    os.chmod(self.public_dir, 0o755)
    self.answers = os.path.join(self.public_dir, "answers.json")
    self._write(self.answers, json.dumps(ANSWERS), 0o644)
    self.shared_canary = os.path.join("/dev/shm", f"mopd-canary-{secrets.token_hex(4)}")
    self._write(self.shared_canary, "canary", 0o666)
    self.connections = []
    self.server = socket.create_server(("127.0.0.1", 0))
    self.port = self.server.getsockname()[1]
    threading.Thread(target=self._serve, daemon=True).start()

  @staticmethod
  def _write(path, text, mode):
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
    os.chmod(path, mode)

  def _serve(self):
    while True:
      try:
        connection, address = self.server.accept()
      except OSError:
        return
      self.connections.append(address)
      connection.close()

  def substitute(self, program):
    for token, value in (
        ("@CANARY@", self.canary),
        ("@HOME@", self.home),
        ("@SSH_KEY@", self.ssh_key),
        ("@ANSWERS@", self.answers),
        ("@SHARED_CANARY@", self.shared_canary),
        ("@PORT@", self.port),
        ("@HOST_DIR@", self.dir),
        ("@TEST_PID@", os.getpid()),
    ):
      program = program.replace(token, repr(value))
    return program

  def intact(self):
    with open(self.canary, encoding="utf-8") as f, open(self.shared_canary, encoding="utf-8") as g:
      return f.read() == "canary" and g.read() == "canary"

  def close(self):
    self.server.close()
    shutil.rmtree(self.dir)
    shutil.rmtree(self.public_dir)
    os.unlink(self.shared_canary)


@pytest.fixture(scope="module")
def host():
  host = Host()
  yield host
  host.close()


@pytest.fixture(scope="module")
def pool():
  return code.default_pool()


@pytest.fixture(autouse=True)
def secret_environment(monkeypatch, request):
  monkeypatch.setenv("MOPD_FAKE_SECRET", SECRET)
  monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
  if "host" in request.fixturenames:
    monkeypatch.setenv("HOME", request.getfixturevalue("host").home)


def sandbox_processes(uids):
  found = []
  for process in psutil.process_iter(["pid", "uids", "ppid", "name"]):
    if process.info["uids"] and process.info["uids"].real in uids:
      found.append(process.info)
  return found


def shared_tmp_entries(uids):
  entries = []
  for directory in SHARED_TMP_DIRS:
    for entry in os.scandir(directory):
      try:
        if entry.stat(follow_symlinks=False).st_uid in uids:
          entries.append(entry.path)
      except FileNotFoundError:
        continue
  return entries


def sysv_segments(uids):
  with open("/proc/sysvipc/shm", encoding="utf-8") as f:
    rows = [line.split() for line in f.readlines()[1:]]
  return [row for row in rows if int(row[7]) in uids]


def fenced(source):
  return f"```python\n{textwrap.dedent(source).strip()}\n```"


# (name, reference, program, needs the private root to score 0 / stay harmless)
ATTACKS = [
    (
        "fork_bomb",
        CALL_REF,
        """
        import os
        def f(x):
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
        """,
        False,
    ),
    (
        "fork_bomb_at_import",
        STDIO_REF,
        """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
        """,
        False,
    ),
    (
        "memory_bomb",
        CALL_REF,
        """
        def f(x):
            blocks = []
            while True:
                blocks.append(bytearray(1 << 26))
        """,
        False,
    ),
    (
        "infinite_loop",
        CALL_REF,
        """
        def f(x):
            while True:
                pass
        """,
        False,
    ),
    (
        "sleep_past_limit",
        STDIO_REF,
        """
        import time
        time.sleep(100)
        """,
        False,
    ),
    (
        "busy_threads",
        CALL_REF,
        """
        import threading
        def spin():
            while True:
                pass
        def f(x):
            for _ in range(6):
                threading.Thread(target=spin, daemon=True).start()
            spin()
        """,
        False,
    ),
    (
        "ignore_signals",
        CALL_REF,
        """
        import signal
        for name in ("SIGALRM", "SIGTERM", "SIGXCPU", "SIGINT", "SIGHUP"):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        def f(x):
            while True:
                pass
        """,
        False,
    ),
    (
        "delete_and_overwrite_canary",
        CALL_REF,
        """
        import os
        def f(x):
            outcomes = []
            for action in (lambda: os.remove(@CANARY@), lambda: open(@CANARY@, "w").write("x"),
                           lambda: os.chmod(@CANARY@, 0o777), lambda: os.rename(@CANARY@, "c")):
                try:
                    outcomes.append(repr(action()))
                except Exception as exc:
                    outcomes.append(type(exc).__name__)
            return outcomes
        """,
        False,
    ),
    (
        "overwrite_world_writable_canary",
        CALL_REF,
        """
        def f(x):
            with open(@SHARED_CANARY@, "w") as out:
                out.write("pwned")
            return "written"
        """,
        True,
    ),
    (
        "write_files_outside_workdir",
        CALL_REF,
        """
        import os
        def f(x):
            written = []
            for directory in ("/tmp", "/var/tmp", "/dev/shm", @HOST_DIR@, "/root", "/"):
                try:
                    path = os.path.join(directory, "mopd-evil")
                    with open(path, "w") as out:
                        out.write("evil")
                    written.append(path)
                except OSError:
                    pass
            return written
        """,
        False,
    ),
    (
        "read_environment_secrets",
        CALL_REF,
        """
        import os
        def f(x):
            return repr(dict(os.environ)) + repr(os.environb)
        """,
        False,
    ),
    (
        "read_ssh_key",
        CALL_REF,
        """
        import os
        def f(x):
            found = []
            for path in (os.path.expanduser("~/.ssh/id_rsa"), @SSH_KEY@, "/root/.ssh/id_rsa",
                         os.path.join(@HOME@, ".ssh", "id_rsa")):
                try:
                    found.append(open(path).read())
                except OSError as exc:
                    found.append(type(exc).__name__)
            return found
        """,
        False,
    ),
    (
        "read_other_processes",
        CALL_REF,
        """
        import os
        def f(x):
            found = []
            for pid in [str(@TEST_PID@), "1", "self"] + os.listdir("/proc"):
                for name in ("environ", "cmdline"):
                    try:
                        found.append(open(f"/proc/{pid}/{name}", "rb").read().decode("latin-1"))
                    except OSError:
                        pass
            return found
        """,
        False,
    ),
    (
        "read_answers_file",
        CALL_REF,
        """
        import json
        def f(x):
            return json.load(open(@ANSWERS@))[x - 1]
        """,
        True,
    ),
    (
        "kill_parent",
        CALL_REF,
        """
        import os
        def f(x):
            os.kill(os.getppid(), 9)
            return "killed"
        """,
        False,
    ),
    (
        "kill_all_processes",
        CALL_REF,
        """
        import os, signal
        def f(x):
            os.kill(-1, signal.SIGKILL)
            os.killpg(0, signal.SIGKILL)
        """,
        False,
    ),
    (
        "kill_everything_by_pid",
        STDIO_REF,
        """
        import os
        for pid in range(1, 4096):
            if pid != os.getpid():
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
        print("done")
        """,
        False,
    ),
    (
        "os_exit_before_tests",
        CALL_REF,
        """
        import os
        print("All tests passed")
        os._exit(0)
        """,
        False,
    ),
    (
        "sys_exit_before_tests",
        STDIO_REF,
        """
        import sys
        print("PASS")
        sys.exit(0)
        """,
        False,
    ),
    (
        "forge_reports_on_every_fd",
        CALL_REF,
        """
        import json, os
        def f(x):
            forged = json.dumps({"results": [{"ok": True, "value": "guess"}] * 2}).encode()
            for fd in range(0, 64):
                try:
                    os.write(fd, forged)
                except OSError:
                    pass
            os._exit(0)
        """,
        False,
    ),
    (
        "monkeypatch_harness",
        CALL_REF,
        """
        import json, sys
        def f(x):
            frame = sys._getframe()
            while frame is not None:
                for name, value in list(frame.f_globals.items()):
                    if name.startswith("_") and callable(value):
                        frame.f_globals[name] = lambda *a, **k: {"ok": True, "value": "patched"}
                frame = frame.f_back
            json.dumps = lambda *a, **k: '{"ok": true, "value": "patched"}'
            print("All tests passed")
            return "patched"
        """,
        False,
    ),
    (
        "override_eq",
        CALL_REF,
        """
        class Liar(str):
            def __eq__(self, other):
                return True
            def __hash__(self):
                return 0
        def f(x):
            return Liar("nope")
        """,
        False,
    ),
    (
        "huge_stdout",
        STDIO_REF,
        """
        import sys
        while True:
            sys.stdout.write("x" * 1000000)
        """,
        False,
    ),
    (
        "huge_return_value",
        CALL_REF,
        """
        def f(x):
            return "x" * 50000000
        """,
        False,
    ),
    (
        "close_standard_streams",
        STDIO_REF,
        """
        import os
        for fd in range(0, 64):
            try:
                os.close(fd)
            except OSError:
                pass
        print("guess")
        """,
        False,
    ),
    (
        "connect_to_local_server",
        CALL_REF,
        """
        import socket
        def f(x):
            outcomes = []
            for host in ("127.0.0.1", "localhost", "0.0.0.0", "::1"):
                try:
                    socket.create_connection((host, @PORT@), timeout=0.5).sendall(b"hi")
                    outcomes.append("connected")
                except OSError as exc:
                    outcomes.append(type(exc).__name__)
            return outcomes
        """,
        False,
    ),
    (
        "ctypes_libc",
        CALL_REF,
        """
        import ctypes
        def f(x):
            libc = ctypes.CDLL(None)
            return [libc.setuid(0), libc.setgid(0), libc.kill(-1, 9), libc.chroot(b"/"),
                    libc.unshare(0x10000000), libc.mount(b"none", b"/tmp", b"tmpfs", 0, None)]
        """,
        False,
    ),
    (
        "raise_rlimits_then_allocate",
        CALL_REF,
        """
        import resource
        def f(x):
            for limit in (resource.RLIMIT_AS, resource.RLIMIT_NPROC, resource.RLIMIT_CPU,
                          resource.RLIMIT_FSIZE, resource.RLIMIT_NOFILE):
                try:
                    resource.setrlimit(limit, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
                except (ValueError, OSError):
                    pass
            return len(bytearray(3 << 30))
        """,
        False,
    ),
    (
        "setsid_escape_with_sleeping_child",
        CALL_REF,
        """
        import os, time
        def f(x):
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    time.sleep(0.5)
                    for path in (@CANARY@, @SHARED_CANARY@):
                        try:
                            os.remove(path)
                        except OSError:
                            pass
                    time.sleep(60)
                os._exit(0)
            return "escaped"
        """,
        False,
    ),
    (
        "huge_file",
        CALL_REF,
        """
        def f(x):
            with open("big", "wb") as out:
                for _ in range(4096):
                    out.write(b"x" * (1 << 20))
            return "written"
        """,
        False,
    ),
    (
        "many_files",
        CALL_REF,
        """
        def f(x):
            for i in range(100000):
                open(f"file{i}", "w").close()
            return "created"
        """,
        False,
    ),
    (
        "exhaust_file_descriptors",
        CALL_REF,
        """
        def f(x):
            handles = []
            while True:
                handles.append(open("/dev/null"))
        """,
        False,
    ),
    (
        "sysv_shared_memory_leak",
        CALL_REF,
        """
        import ctypes
        def f(x):
            libc = ctypes.CDLL(None)
            return libc.shmget(0, 1 << 20, 0o1000 | 0o666)
        """,
        False,
    ),
    (
        "privilege_escalation_tools",
        CALL_REF,
        """
        import subprocess
        def f(x):
            outcomes = []
            for argv in (["su", "-c", "id"], ["sudo", "id"], ["chroot", "/", "id"]):
                try:
                    outcomes.append(subprocess.run(argv, capture_output=True, timeout=1).returncode)
                except Exception as exc:
                    outcomes.append(type(exc).__name__)
            return outcomes
        """,
        False,
    ),
    (
        "read_stdin_and_other_fds",
        STDIO_REF,
        """
        import os, sys
        data = sys.stdin.read()
        for fd in range(3, 64):
            try:
                data += os.read(fd, 1000).decode("latin-1")
            except OSError:
                pass
        print(data)
        """,
        False,
    ),
]


def test_has_enough_attacks():
  assert len(ATTACKS) >= 25
  assert len({name for name, *_ in ATTACKS}) == len(ATTACKS)


@pytest.mark.parametrize(
    "name,reference,program,needs_private_root", ATTACKS, ids=[attack[0] for attack in ATTACKS]
)
def test_attack_is_contained(name, reference, program, needs_private_root, host, pool):
  if needs_private_root and not pool.isolation["private_root"]:
    pytest.skip("only the private root hides world-accessible host files")
  start = time.monotonic()
  result = code.score(fenced(host.substitute(program)), reference, time_limit_s=LIMIT_S)
  elapsed = time.monotonic() - start

  assert result.reward == 0.0, (name, result)
  assert result.status in ("ok", "timeout", "format_error"), result  # "error": a worker died.
  assert elapsed < BUDGET_S, (name, elapsed)
  assert SECRET not in result.feedback
  assert sandbox_processes(pool.uids) == []
  assert os.listdir(os.path.join(pool.base_dir, "runs")) == []
  assert shared_tmp_entries(pool.uids) == []
  assert sysv_segments(pool.uids) == []
  assert host.connections == []
  if name == "setsid_escape_with_sleeping_child":
    time.sleep(1.0)  # The escaped child would act after 0.5 s if it were still alive.
  assert host.intact()
  assert code.score(fenced(GOOD[0]), GOOD[1]) == Result(1.0, "", 1.0, "ok")


def test_isolation_report_matches_the_platform(pool):
  report = code.isolation_report()
  assert report is pool.isolation
  assert report["probe"]["environment"] == ["HOME", "LANG", "PATH", "TMPDIR"]
  assert report["privileges_dropped"]
  if os.geteuid() == 0:
    assert report["probe"]["uid"] in pool.uids and report["probe"]["groups"] == []
  namespaces_work = (
      shutil.which("unshare")
      and subprocess.run(
          ["unshare", "--net", "--mount", "--pid", "--fork", "true"], check=False
      ).returncode
      == 0
  )
  if namespaces_work:
    assert report["network_isolated"] and report["private_root"] and report["pid_namespace"]
    assert report["probe"]["pid"] == 1 and report["disabled"] == []


EXEC_HARNESS = "def run(payload, report_fd):\n  exec(payload.decode())\n"


def test_runs_cannot_write_to_the_verifiers_output(capfd):
  with sandbox.SandboxPool(EXEC_HARNESS, num_workers=1) as small:  # Inherits the captured fds.
    leak = (
        "import os, sys\nfor fd in (1, 2):\n  os.write(fd, b'LEAK')\n"
        "print('LEAK')\nprint('LEAK', file=sys.stderr)\nsys.stdout.flush()\nsys.stderr.flush()\n"
        "os.write(report_fd, b'done')\n"
    )
    assert small.run(leak.encode(), 2.0).report == b"done"
  captured = capfd.readouterr()
  assert "LEAK" not in captured.out + captured.err


def test_worker_crash_is_an_error_then_recovers():
  with sandbox.SandboxPool(EXEC_HARNESS, num_workers=1) as small:
    (worker,) = small.worker_pids
    os.kill(worker, 9)
    with pytest.raises(sandbox.SandboxError, match=str(worker)):
      small.run(b"import os\nos.write(report_fd, b'1')", 2.0)
    assert small.run(b"import os\nos.write(report_fd, b'1')", 2.0).report == b"1"
    assert small.worker_pids != [worker]


def test_workers_are_recycled_after_n_tasks():
  with sandbox.SandboxPool(EXEC_HARNESS, num_workers=1, tasks_per_worker=2) as small:
    first = small.worker_pids
    small.run(b"pass", 2.0)
    assert small.worker_pids == first
    small.run(b"pass", 2.0)
    assert small.worker_pids == []  # Stopped; the next task starts a fresh one.
    small.run(b"pass", 2.0)
    assert small.worker_pids not in ([], first)


FALLBACK_ATTACKS = {
    "setsid_sleeper": "import os, time\nif os.fork() == 0:\n  os.setsid()\n  time.sleep(60)\n",
    "fork_bomb": "import os\nwhile True:\n  try:\n    os.fork()\n  except OSError:\n    pass\n",
    "shared_tmp_files": (
        "import os\nfor d in ('/tmp', '/var/tmp', '/dev/shm'):\n"
        "  open(os.path.join(d, 'mopd-evil'), 'w').close()\n"
        "  os.makedirs(os.path.join(d, 'mopd-evil-dir', 'sub'))\n"
    ),
    "workdir_files": "import os\nos.makedirs('a/b')\nopen('a/b/c', 'w').close()\nos.chmod('a', 0)\n",
}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to a sandbox uid")
def test_without_namespaces_the_uid_still_contains_programs():
  with sandbox.SandboxPool(EXEC_HARNESS, num_workers=1, namespaces=False) as plain:
    assert not plain.isolation["private_root"] and not plain.isolation["pid_namespace"]
    assert plain.isolation["privileges_dropped"]
    for name, program in FALLBACK_ATTACKS.items():
      run = plain.run(program.encode(), 1.0)
      assert sandbox_processes(plain.uids) == [], name
      assert shared_tmp_entries(plain.uids) == [], name
      assert os.listdir(os.path.join(plain.base_dir, "runs")) == [], name
      assert run.wall_s < 1.0 + 1.0, (name, run)


UNPRIVILEGED_SCRIPT = """
import importlib.util, json, os, sys, time
spec = importlib.util.spec_from_file_location("sandbox", sys.argv[1])
sandbox = sys.modules["sandbox"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sandbox)
attacks = json.loads(sys.argv[2])
harness = "def run(payload, report_fd):\\n  exec(payload.decode())\\n"
out = {}
for namespaces in (True, False):
  with sandbox.SandboxPool(harness, num_workers=1, namespaces=namespaces) as pool:
    mode = out[str(namespaces)] = {"isolation": pool.isolation, "leftovers": {}}
    mine = {os.getpid()} | set(pool.worker_pids)
    for name, program in attacks.items():
      if not pool.isolation["private_root"] and name in ("kill_all", "shared_tmp_files"):
        continue  # Without namespaces these would reach the user's own processes and files.
      pool.run(program.encode(), 1.0)
      mode["leftovers"][name] = [pid for pid, (_, uid, _) in sandbox._process_table().items()
                                 if uid == os.getuid() and pid not in mine]
print(json.dumps(out))
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"),
    reason="needs root, unshare and setpriv to start an unprivileged verifier",
)
def test_unprivileged_verifier_still_contains_programs():
  """The verifier as `nobody`: namespaces come from a user namespace, no uid is dropped."""
  attacks = dict(FALLBACK_ATTACKS, kill_all="import os\nos.kill(-1, 9)\n")
  public = tempfile.mkdtemp(prefix="mopd-unprivileged-")
  try:
    os.chmod(public, 0o755)
    shutil.copy(sandbox.__file__, os.path.join(public, "sandbox.py"))
    prefix = os.path.realpath(sys.base_prefix)
    # A private mount namespace in which the Python installation is readable by nobody.
    setup = (
        f"mkdir -p {public}/prefix && mount --bind {prefix} {public}/prefix && "
        f"mount -t tmpfs -o mode=0755 tmpfs /root && mkdir -p {prefix} && "
        f"mount --bind {public}/prefix {prefix} && exec setpriv --reuid=65534 "
        f'--regid=65534 --clear-groups {sys.executable} -I -c "$0" "$1" "$2"'
    )
    if not prefix.startswith("/root/"):
      setup = (
          f"exec setpriv --reuid=65534 --regid=65534 --clear-groups {sys.executable} "
          f'-I -c "$0" "$1" "$2"'
      )
    proc = subprocess.run(
        [
            "unshare",
            "--mount",
            "sh",
            "-c",
            setup,
            UNPRIVILEGED_SCRIPT,
            os.path.join(public, "sandbox.py"),
            json.dumps(attacks),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
  finally:
    shutil.rmtree(public, ignore_errors=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout)
  for mode in out.values():
    assert not mode["isolation"]["verifier_is_root"] and mode["isolation"]["privileges_dropped"]
    assert mode["isolation"]["probe"]["capabilities"] == 0
    assert all(leftovers == [] for leftovers in mode["leftovers"].values()), mode["leftovers"]
  assert set(out["False"]["leftovers"]) == {"setsid_sleeper", "fork_bomb", "workdir_files"}
  if (
      subprocess.run(
          [
              "setpriv",
              "--reuid=65534",
              "--regid=65534",
              "--clear-groups",
              "unshare",
              "--user",
              "--net",
              "--mount",
              "true",
          ],
          check=False,
      ).returncode
      == 0
  ):
    isolation = out["True"]["isolation"]
    assert isolation["network_isolated"] and isolation["private_root"]
    assert isolation["pid_namespace"] and set(out["True"]["leftovers"]) == set(attacks)
