"""Correct and incorrect solutions of LiveCodeBench-style problems through the code verifier.

Both test styles (call-based, with module functions and LeetCode-style `class Solution`,
and stdin/stdout), with edge cases: trailing whitespace, large integers, floats,
multi-line output, keyword arguments, empty inputs, `open(0)` and binary stdin.
"""

import math
import textwrap

import pytest

from mopd_jax.verifiers import code


def call(fn_name, cases):
  return {
      "fn_name": fn_name,
      "inputs": [args for args, _ in cases],
      "outputs": [out for _, out in cases],
  }


def stdio(cases):
  return {"inputs": [text for text, _ in cases], "outputs": [out for _, out in cases]}


# name -> (tests, correct program, incorrect program)
PROBLEMS = {
    "two_sum_class_solution": (
        call(
            "twoSum",
            [([[2, 7, 11, 15], 9], [0, 1]), ([[3, 2, 4], 6], [1, 2]), ([[3, 3], 6], [0, 1])],
        ),
        """
        class Solution:
            def twoSum(self, nums, target):
                seen = {}
                for i, x in enumerate(nums):
                    if target - x in seen:
                        return [seen[target - x], i]
                    seen[x] = i
        """,
        """
        class Solution:
            def twoSum(self, nums, target):
                for i in range(len(nums)):
                    for j in range(len(nums)):
                        if nums[i] + nums[j] == target:
                            return [i, j]
        """,
    ),
    "palindrome_bool": (
        call(
            "is_palindrome",
            [
                (["racecar"], True),
                (["ab"], False),
                ([""], True),
                (["A man, a plan, a canal: Panama"], True),
            ],
        ),
        """
        def is_palindrome(s):
            t = [c.lower() for c in s if c.isalnum()]
            return t == t[::-1]
        """,
        """
        def is_palindrome(s):
            return 1 if s == s[::-1] else 0
        """,
    ),
    "fizzbuzz_list": (
        call(
            "fizzbuzz",
            [
                ([5], ["1", "2", "Fizz", "4", "Buzz"]),
                ([1], ["1"]),
                ([0], []),
                (
                    [15],
                    [
                        str(i) if i % 3 and i % 5 else "Fizz" * (i % 3 == 0) + "Buzz" * (i % 5 == 0)
                        for i in range(1, 16)
                    ],
                ),
            ],
        ),
        """
        def fizzbuzz(n):
            return ["FizzBuzz" if i % 15 == 0 else "Fizz" if i % 3 == 0 else
                    "Buzz" if i % 5 == 0 else str(i) for i in range(1, n + 1)]
        """,
        """
        def fizzbuzz(n):
            return ["Fizz" if i % 3 == 0 else "Buzz" if i % 5 == 0 else str(i)
                    for i in range(1, n + 1)]
        """,
    ),
    "factorial_large_integer": (
        call("factorial", [([0], 1), ([20], math.factorial(20)), ([60], math.factorial(60))]),
        """
        def factorial(n):
            result = 1
            for k in range(2, n + 1):
                result *= k
            return result
        """,
        """
        def factorial(n):
            result = 1.0
            for k in range(2, n + 1):
                result *= k
            return result
        """,
    ),
    "fibonacci_300": (
        call(
            "fib",
            [
                ([1], 1),
                ([2], 1),
                ([300], 222232244629420445529739893461909967206666939096499764990979600),
            ],
        ),
        """
        def fib(n):
            a, b = 0, 1
            for _ in range(n):
                a, b = b, a + b
            return a
        """,
        """
        def fib(n):
            a, b = 0, 1
            for _ in range(n):
                a, b = b, (a + b) % (2 ** 64)
            return a
        """,
    ),
    "mean_float_tolerance": (
        call("mean", [([[1, 2, 3, 4]], 2.5), ([[0.1, 0.2]], 0.15000000000000002), ([[7]], 7.0)]),
        """
        def mean(values):
            return sum(values) / len(values)
        """,
        """
        def mean(values):
            return sum(values) // len(values)
        """,
    ),
    "newton_sqrt": (
        call("root", [([2.0], 2**0.5), ([1e6], 1000.0), ([0.25], 0.5)]),
        """
        def root(x):
            guess = x if x > 1 else 1.0
            for _ in range(100):
                guess = (guess + x / guess) / 2
            return guess
        """,
        """
        def root(x):
            guess = x if x > 1 else 1.0
            for _ in range(3):
                guess = (guess + x / guess) / 2
            return guess
        """,
    ),
    "reverse_words": (
        call(
            "reverse_words",
            [
                (["the sky is blue"], "blue is sky the"),
                (["  hello world  "], "world hello"),
                (["a"], "a"),
            ],
        ),
        """
        def reverse_words(s):
            return " ".join(reversed(s.split()))
        """,
        """
        def reverse_words(s):
            return " ".join(reversed(s.split(" ")))
        """,
    ),
    "merge_intervals": (
        call(
            "merge",
            [
                ([[[1, 3], [2, 6], [8, 10], [15, 18]]], [[1, 6], [8, 10], [15, 18]]),
                ([[[1, 4], [4, 5]]], [[1, 5]]),
                ([[]], []),
            ],
        ),
        """
        def merge(intervals):
            out = []
            for start, end in sorted(intervals):
                if out and start <= out[-1][1]:
                    out[-1][1] = max(out[-1][1], end)
                else:
                    out.append([start, end])
            return out
        """,
        """
        def merge(intervals):
            out = []
            for start, end in sorted(intervals):
                if out and start < out[-1][1]:
                    out[-1][1] = max(out[-1][1], end)
                else:
                    out.append([start, end])
            return out
        """,
    ),
    "char_counts_dict": (
        call("counts", [(["hello"], {"h": 1, "e": 1, "l": 2, "o": 1}), ([""], {})]),
        """
        from collections import Counter
        def counts(s):
            return dict(Counter(s))
        """,
        """
        def counts(s):
            return {c: s.count(c) for c in set(s) if c != "l"}
        """,
    ),
    "max_subarray_negative": (
        call(
            "max_subarray",
            [([[-2, 1, -3, 4, -1, 2, 1, -5, 4]], 6), ([[-3, -1, -2]], -1), ([[5]], 5)],
        ),
        """
        def max_subarray(nums):
            best = current = nums[0]
            for x in nums[1:]:
                current = max(x, current + x)
                best = max(best, current)
            return best
        """,
        """
        def max_subarray(nums):
            best = current = 0
            for x in nums:
                current = max(0, current + x)
                best = max(best, current)
            return best
        """,
    ),
    "search_insert": (
        call(
            "search_insert",
            [([[1, 3, 5, 6], 5], 2), ([[1, 3, 5, 6], 2], 1), ([[1, 3, 5, 6], 7], 4), ([[], 3], 0)],
        ),
        """
        import bisect
        def search_insert(nums, target):
            return bisect.bisect_left(nums, target)
        """,
        """
        def search_insert(nums, target):
            for i, x in enumerate(nums):
                if x >= target:
                    return i
            return len(nums) - 1
        """,
    ),
    "transpose_matrix": (
        call("transpose", [([[[1, 2, 3], [4, 5, 6]]], [[1, 4], [2, 5], [3, 6]]), ([[[7]]], [[7]])]),
        """
        def transpose(m):
            return [list(row) for row in zip(*m)]
        """,
        """
        def transpose(m):
            return [row[::-1] for row in m]
        """,
    ),
    "longest_common_prefix": (
        call(
            "lcp",
            [([["flower", "flow", "flight"]], "fl"), ([["dog", "racecar", "car"]], ""), ([[]], "")],
        ),
        """
        import os
        def lcp(words):
            return os.path.commonprefix(words) if words else ""
        """,
        """
        def lcp(words):
            return words[0][:2] if words else ""
        """,
    ),
    "power_keyword_arguments": (
        call(
            "power",
            [({"base": 2, "exp": 10}, 1024), ({"base": 3, "exp": 0}, 1), ([10, 30], 10**30)],
        ),
        """
        def power(base, exp):
            return base ** exp
        """,
        """
        def power(exp, base):
            return base ** exp
        """,
    ),
    "valid_parentheses": (
        call("is_valid", [(["()[]{}"], True), (["(]"], False), (["([)]"], False), ([""], True)]),
        """
        def is_valid(s):
            stack, pairs = [], {")": "(", "]": "[", "}": "{"}
            for c in s:
                if c in pairs:
                    if not stack or stack.pop() != pairs[c]:
                        return False
                else:
                    stack.append(c)
            return not stack
        """,
        """
        def is_valid(s):
            return all(s.count(a) == s.count(b) for a, b in ("()", "[]", "{}"))
        """,
    ),
    "roman_to_int": (
        call("roman", [(["III"], 3), (["LVIII"], 58), (["MCMXCIV"], 1994)]),
        """
        def roman(s):
            values = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}
            total = 0
            for a, b in zip(s, s[1:] + " "):
                v = values[a]
                total += -v if b != " " and values[b] > v else v
            return total
        """,
        """
        def roman(s):
            values = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100, "D": 500, "M": 1000}
            return sum(values[c] for c in s)
        """,
    ),
    "unique_paths_big": (
        call("paths", [([3, 7], 28), ([1, 1], 1), ([100, 100], math.comb(198, 99))]),
        """
        from math import comb
        def paths(m, n):
            return comb(m + n - 2, m - 1)
        """,
        """
        def paths(m, n):
            return (m + n - 2) * (m - 1)
        """,
    ),
    "min_max_tuple": (
        call("min_max", [([[3, 1, 2]], [1, 3]), ([[5]], [5, 5])]),
        """
        def min_max(values):
            return min(values), max(values)
        """,
        """
        def min_max(values):
            return {"min": min(values), "max": max(values)}
        """,
    ),
    "a_plus_b_lines": (
        stdio([("1 2\n", "3\n"), ("-5 5\n", "0\n"), ("1000000000 1000000000\n", "2000000000\n")]),
        """
        a, b = map(int, input().split())
        print(a + b)
        """,
        """
        a, b = map(int, input().split())
        print(a + b + (a < 0))
        """,
    ),
    "trailing_whitespace": (
        stdio([("3\n1 2 3\n", "6   \n\n"), ("1\n  42  \n", "  42")]),
        """
        n = int(input())
        print(f"{sum(map(int, input().split()))}   ")
        print()
        """,
        """
        n = int(input())
        print(sum(map(int, input().split())), "!")
        """,
    ),
    "matrix_multiline_output": (
        stdio([("2 3\n", "1 2 3\n2 4 6\n"), ("1 1\n", "1\n")]),
        """
        r, c = map(int, input().split())
        for i in range(1, r + 1):
            print(" ".join(str(i * j) for j in range(1, c + 1)))
        """,
        """
        r, c = map(int, input().split())
        for i in range(1, r + 1):
            print(" ".join(str(i * j) for j in range(1, c + 1)), end=" ")
        """,
    ),
    "big_integer_product": (
        stdio(
            [
                (
                    "123456789012345678901234567890\n987654321098765432109876543210\n",
                    str(123456789012345678901234567890 * 987654321098765432109876543210) + "\n",
                )
            ]
        ),
        """
        import sys
        a, b = map(int, sys.stdin.read().split())
        print(a * b)
        """,
        """
        import sys
        a, b = map(float, sys.stdin.read().split())
        print(int(a * b))
        """,
    ),
    "float_formatting": (
        stdio([("3\n1 2 4\n", "2.333333\n"), ("2\n1 2\n", "1.500000\n")]),
        """
        n = int(input())
        values = list(map(int, input().split()))
        print(f"{sum(values) / n:.6f}")
        """,
        """
        n = int(input())
        values = list(map(int, input().split()))
        print(sum(values) / n)
        """,
    ),
    "word_count_open0": (
        stdio([("the cat\nthe dog\n", "cat 1\ndog 1\nthe 2\n"), ("", "")]),
        """
        from collections import Counter
        words = Counter(open(0).read().split())
        for word in sorted(words):
            print(word, words[word])
        """,
        """
        from collections import Counter
        words = Counter(open(0).read().split())
        for word in words:
            print(word, words[word])
        """,
    ),
    "sort_lines_binary_stdin": (
        stdio([("3\nbanana\napple\ncherry\n", "apple\nbanana\ncherry\n")]),
        """
        import sys
        data = sys.stdin.buffer.read().split()
        sys.stdout.write("\\n".join(w.decode() for w in sorted(data[1:])) + "\\n")
        """,
        """
        import sys
        data = sys.stdin.buffer.read().split()
        sys.stdout.write("\\n".join(w.decode() for w in data[1:]) + "\\n")
        """,
    ),
    "prime_sieve_performance": (
        stdio([("1000000\n", "78498\n"), ("10\n", "4\n"), ("1\n", "0\n")]),
        """
        n = int(input())
        sieve = bytearray([1]) * (n + 1)
        sieve[0:2] = b"\\x00\\x00"[: n + 1]
        for p in range(2, int(n ** 0.5) + 1):
            if sieve[p]:
                sieve[p * p :: p] = bytearray(len(range(p * p, n + 1, p)))
        print(sum(sieve))
        """,
        """
        n = int(input())
        print(sum(all(k % d for d in range(2, k)) for k in range(2, n + 1)))
        """,
    ),
    "bfs_grid_shortest_path": (
        stdio([("3 3\n...\n.#.\n...\n", "4\n"), ("2 2\n.#\n#.\n", "-1\n")]),
        """
        from collections import deque
        h, w = map(int, input().split())
        grid = [input() for _ in range(h)]
        dist = {(0, 0): 0}
        queue = deque([(0, 0)])
        while queue:
            r, c = queue.popleft()
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < h and 0 <= nc < w and grid[nr][nc] == "." and (nr, nc) not in dist:
                    dist[nr, nc] = dist[r, c] + 1
                    queue.append((nr, nc))
        print(dist.get((h - 1, w - 1), -1))
        """,
        """
        h, w = map(int, input().split())
        print(h + w - 2)
        """,
    ),
    "yes_no_queries": (
        stdio([("3\n4\n7\n10\n", "YES\nNO\nYES\n")]),
        """
        q = int(input())
        for _ in range(q):
            print("YES" if int(input()) % 2 == 0 else "NO")
        """,
        """
        q = int(input())
        for _ in range(q):
            print("Yes" if int(input()) % 2 == 0 else "No")
        """,
    ),
    "unicode_reverse": (
        stdio([("héllo wörld\n", "dlröw olléh\n")]),
        """
        print(input()[::-1])
        """,
        """
        print(input().encode("utf-8")[::-1].decode("utf-8", "replace"))
        """,
    ),
    "gcd_lcm_fast_io": (
        stdio([("2\n12 18\n7 5\n", "6 36\n1 35\n")]),
        """
        import sys, math
        data = sys.stdin.buffer.read().split()
        out = []
        for i in range(int(data[0])):
            a, b = int(data[1 + 2 * i]), int(data[2 + 2 * i])
            out.append(f"{math.gcd(a, b)} {a * b // math.gcd(a, b)}")
        sys.stdout.write("\\n".join(out) + "\\n")
        """,
        """
        import sys, math
        data = sys.stdin.buffer.read().split()
        out = []
        for i in range(int(data[0])):
            a, b = int(data[1 + 2 * i]), int(data[2 + 2 * i])
            out.append(f"{math.gcd(a, b)} {a * b}")
        sys.stdout.write("\\n".join(out) + "\\n")
        """,
    ),
    "main_guard_and_exit_code": (
        stdio([("5\n", "120\n")]),
        """
        import sys
        def main():
            n = int(sys.stdin.readline())
            print(__import__("math").factorial(n))
            sys.exit(0)
        if __name__ == "__main__":
            main()
        """,
        """
        import sys
        def main():
            n = int(sys.stdin.readline())
            print(__import__("math").factorial(n))
            sys.exit(1)
        if __name__ == "__main__":
            main()
        """,
    ),
    "too_slow_is_wrong": (
        call("count_pairs", [([30000], 30000 * 29999 // 2)]),
        """
        def count_pairs(n):
            return n * (n - 1) // 2
        """,
        """
        def count_pairs(n):
            total = 0
            for i in range(n):
                for j in range(i + 1, n):
                    total += 1
            return total
        """,
    ),
}


def fenced(source):
  return f"Solution:\n```python\n{textwrap.dedent(source).strip()}\n```\n"


def test_problem_set_is_large_and_mixed():
  assert len(PROBLEMS) >= 30
  styles = [tests.get("fn_name") is None for tests, _, _ in PROBLEMS.values()]
  assert sum(styles) >= 10 and len(styles) - sum(styles) >= 10


def test_correct_solutions_score_one():
  names = list(PROBLEMS)
  results = code.score_batch(
      [fenced(PROBLEMS[n][1]) for n in names], [PROBLEMS[n][0] for n in names]
  )
  failed = {
      n: r for n, r in zip(names, results) if (r.reward, r.accuracy, r.status) != (1.0, 1.0, "ok")
  }
  assert not failed


def test_incorrect_solutions_score_zero():
  names = list(PROBLEMS)
  results = code.score_batch(
      [fenced(PROBLEMS[n][2]) for n in names], [PROBLEMS[n][0] for n in names]
  )
  passed = {n: r for n, r in zip(names, results) if r.reward != 0.0 or r.accuracy == 1.0}
  assert not passed
  assert all(r.feedback.startswith("Test ") for r in results)


@pytest.mark.parametrize("name", ["too_slow_is_wrong"])
def test_slow_solution_fails_by_timeout(name):
  tests, _, slow = PROBLEMS[name]
  result = code.score(fenced(slow), tests)
  assert result.status == "timeout" and "time limit exceeded (2.0 s)" in result.feedback
