r"""Throughput of the sandboxed code verifier against running the same code in-process.

    python -m benchmarks.verifier_throughput            # 512 responses x 10 tests

Verifies 512 responses (8 problem templates, both test styles, half of them wrong) with
10 tests each through `code.score_batch_with_stats` on the verifier's pool (one worker
per core), then runs the same programs on the same tests in this process without any
sandbox (exec + call, or exec with StringIO stdin/stdout). Reports responses/s, the
sandbox's extra core-milliseconds per test, and how busy the workers kept the cores:
(CPU time of the workers and everything they forked) / wall time, which approaches the
number of workers when the pool keeps every core busy.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import sys
import time

import psutil

from mopd_jax.verifiers import code

TEMPLATES = {
    "sort_call": (
        "solve",
        "def solve(nums):\n    return sorted(x + {bug} for x in nums)",
        lambda k: [[[(i * 7919 + k) % 1000 for i in range(200)]]],
        lambda args: sorted(args[0]),
    ),
    "sum_squares_call": (
        "solve",
        "def solve(n):\n    return sum(i * i for i in range(n)) + {bug}",
        lambda k: [[2000 + 37 * k]],
        lambda args: sum(i * i for i in range(args[0])),
    ),
    "two_sum_class": (
        "twoSum",
        (
            "class Solution:\n    def twoSum(self, nums, target):\n        seen = {{}}\n"
            "        for i, x in enumerate(nums):\n            if target - x in seen:\n"
            "                return [seen[target - x], i + {bug}]\n            seen[x] = i"
        ),
        lambda k: [[list(range(300)), 299 + k % 290]],
        lambda args: _two_sum(*args),
    ),
    "reverse_call": (
        "solve",
        "def solve(s):\n    return s[::-1] + 'x' * {bug}",
        lambda k: [["abcdefghij" * (k + 1)]],
        lambda args: args[0][::-1],
    ),
    "a_plus_b_stdio": (
        None,
        "a, b = map(int, input().split())\nprint(a + b + {bug})",
        lambda k: f"{k * 12345} {k * 54321}\n",
        lambda text: f"{sum(map(int, text.split()))}\n",
    ),
    "sort_numbers_stdio": (
        None,
        (
            "import sys\ndata = sys.stdin.read().split()\n"
            "print(' '.join(map(str, sorted(int(x) + {bug} for x in data[1:]))))"
        ),
        lambda k: f"300\n{' '.join(str((i * 104729 + k) % 997) for i in range(300))}\n",
        lambda text: " ".join(map(str, sorted(int(x) for x in text.split()[1:]))) + "\n",
    ),
    "word_count_stdio": (
        None,
        (
            "import sys\nfrom collections import Counter\nwords = Counter(sys.stdin.read().split())\n"
            "for w in sorted(words):\n    print(w, words[w] + {bug})"
        ),
        lambda k: " ".join(f"w{(i * k) % 17}" for i in range(200)) + "\n",
        lambda text: "".join(f"{w} {text.split().count(w)}\n" for w in sorted(set(text.split()))),
    ),
    "grid_paths_stdio": (
        None,
        (
            "n = int(input())\ndp = [[1] * n for _ in range(n)]\nfor i in range(1, n):\n"
            "    for j in range(1, n):\n        dp[i][j] = dp[i - 1][j] + dp[i][j - 1]\n"
            "print(dp[-1][-1] + {bug})"
        ),
        lambda k: f"{20 + k % 30}\n",
        lambda text: f"{_paths(int(text))}\n",
    ),
}


def _two_sum(nums, target):
  seen = {}
  for i, x in enumerate(nums):
    if target - x in seen:
      return [seen[target - x], i]
    seen[x] = i
  return None


def _paths(n):
  dp = [[1] * n for _ in range(n)]
  for i in range(1, n):
    for j in range(1, n):
      dp[i][j] = dp[i - 1][j] + dp[i][j - 1]
  return dp[-1][-1]


def make_batch(num_responses: int, num_tests: int):
  """(responses, references): templates in turn, every other response wrong."""
  names = list(TEMPLATES)
  responses, references = [], []
  for index in range(num_responses):
    fn_name, program, make_input, answer = TEMPLATES[names[index % len(names)]]
    inputs = [make_input(index + test) for test in range(num_tests)]
    if fn_name is not None:
      inputs = [args[0] for args in inputs]
    outputs = [answer(test_input) for test_input in inputs]
    source = program.format(bug=(index // len(names)) % 2)
    responses.append(f"Here is my solution.\n```python\n{source}\n```\n")
    references.append({"fn_name": fn_name, "inputs": inputs, "outputs": outputs})
  return responses, references


def run_in_process(response: str, reference: dict) -> bool:
  """The same program on the same tests with no isolation at all."""
  program = compile(code.extract_code(response), "<solution>", "exec")
  passed = True
  for test_input, expected in zip(reference["inputs"], reference["outputs"]):
    if reference["fn_name"] is not None:
      namespace = {"__name__": "solution"}
      exec(program, namespace)  # pylint: disable=exec-used
      fn = namespace.get(reference["fn_name"]) or getattr(
          namespace["Solution"](), reference["fn_name"]
      )
      passed &= json.loads(json.dumps(fn(*test_input))) == expected
    else:
      stdout, stdin = io.StringIO(), sys.stdin
      with contextlib.redirect_stdout(stdout):
        sys.stdin = io.StringIO(test_input)
        try:
          exec(program, {"__name__": "__main__"})  # pylint: disable=exec-used
        finally:
          sys.stdin = stdin
      passed &= stdout.getvalue().split() == expected.split()
  return passed


def cpu_seconds(processes) -> float:
  """User + system CPU of `processes` and of all their waited-for descendants."""
  total = 0.0
  for process in processes:
    times = process.cpu_times()
    total += times.user + times.system + times.children_user + times.children_system
  return total


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--responses", type=int, default=512)
  parser.add_argument("--tests", type=int, default=10)
  args = parser.parse_args()
  responses, references = make_batch(args.responses, args.tests)
  num_tests = args.responses * args.tests

  start = time.perf_counter()
  pool = code.default_pool()
  startup_s = time.perf_counter() - start
  workers = [psutil.Process(pid) for pid in pool.worker_pids]
  code.score_batch(responses[:16], references[:16])  # Warm-up.

  cpu_before, parent_before = cpu_seconds(workers), time.process_time()
  start = time.perf_counter()
  results, stats = code.score_batch_with_stats(responses, references)
  wall_s = time.perf_counter() - start
  worker_cpu_s = cpu_seconds(workers) - cpu_before
  parent_cpu_s = time.process_time() - parent_before

  start = time.perf_counter()
  in_process = [run_in_process(r, ref) for r, ref in zip(responses, references)]
  in_process_s = time.perf_counter() - start

  rewards = [r.reward == 1.0 for r in results]
  if rewards != in_process:
    raise RuntimeError("The sandbox and the in-process run disagree on some responses.")
  sandbox_core_ms = 1e3 * wall_s * pool.num_workers / num_tests
  in_process_ms = 1e3 * in_process_s / num_tests
  numbers = {
      "machine": f"{platform.machine()}, {psutil.cpu_count()} cores, "
      f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Linux {platform.release()}",
      "workers": pool.num_workers,
      "isolation": {
          k: pool.isolation[k]
          for k in ("privileges_dropped", "network_isolated", "private_root", "pid_namespace")
      },
      "responses": args.responses,
      "tests_per_response": args.tests,
      "passing_responses": sum(rewards),
      "pool_startup_s": round(startup_s, 3),
      "wall_s": round(wall_s, 2),
      "responses_per_s": round(args.responses / wall_s, 1),
      "tests_per_s": round(num_tests / wall_s, 1),
      "mean_latency_per_response_ms": round(1e3 * stats["verify/mean_time_s"], 1),
      "sandbox_core_ms_per_test": round(sandbox_core_ms, 2),
      "in_process_ms_per_test": round(in_process_ms, 3),
      "overhead_core_ms_per_test": round(sandbox_core_ms - in_process_ms, 2),
      "worker_cpu_s": round(worker_cpu_s, 2),
      "worker_cpu_over_wall": round(worker_cpu_s / wall_s, 2),
      "parent_cpu_over_wall": round(parent_cpu_s / wall_s, 2),
      "stats": stats,
  }
  print(json.dumps(numbers, indent=2))


if __name__ == "__main__":
  main()
