"""Held-out metrics: mean@n and unbiased pass@k, overall and per source, and the source
names that the data layer carries from the problems to the evaluator."""

import os

import numpy as np
import pytest

from mopd_jax import evaluation, train
from mopd_jax.data import cache, source_splits, sources
from mopd_jax.verifiers import callback, result
from tests.conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")


def reference_pass_at_k(n, c, k):
  """1 - C(n-c, k) / C(n, k) as the product prod_{i=n-c+1}^{n} (1 - k / i) (float64)."""
  if n - c < k:
    return 1.0
  return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def test_per_source_metrics_match_a_direct_computation():
  n = 8
  rng = np.random.default_rng(0)
  labels = np.array(["aime", "hmmt", "aime", "lcb", "hmmt", "aime", "lcb"])
  # Rewards in {0, 0.5, 1}; threshold 1.0, so 0.5 is a failure for pass@k but counts in mean.
  rewards = rng.choice([0.0, 0.5, 1.0], size=(len(labels), n), p=[0.5, 0.2, 0.3])
  rewards[1] = 1.0  # a problem solved every time
  rewards[3] = 0.0  # and one never solved
  status = np.zeros(rewards.size, np.int32)
  status[[3, 17]] = callback.STATUS_CODES["error"]
  got = evaluation.eval_metrics(rewards.reshape(-1), status, labels, num_samples=n,
                                threshold=1.0)

  ks = (1, 2, 4, 8)
  correct = (rewards >= 1.0).sum(1)
  expected = {"eval/mean@8": rewards.mean(), "eval/success_rate": (rewards >= 1.0).mean(),
              "eval/verifier_errors": 2}
  for k in ks:
    expected[f"eval/pass@{k}"] = np.mean([reference_pass_at_k(n, c, k) for c in correct])
  for name in ("aime", "hmmt", "lcb"):
    rows = [i for i, label in enumerate(labels) if label == name]
    expected[f"eval/{name}/mean@8"] = np.mean([rewards[i].mean() for i in rows])
    expected[f"eval/{name}/num_problems"] = len(rows)
    for k in ks:
      expected[f"eval/{name}/pass@{k}"] = np.mean(
          [reference_pass_at_k(n, correct[i], k) for i in rows])
  assert sorted(got) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_allclose(got[key], value, rtol=1e-12, err_msg=key)
  assert got["eval/hmmt/pass@1"] != got["eval/aime/pass@1"]
  assert got["eval/lcb/pass@8"] == pytest.approx(0.5)  # one solved-always, one never


def test_pass_at_k_sizes_are_powers_of_two_and_n():
  assert evaluation.pass_at_k_sizes(1) == (1,)
  assert evaluation.pass_at_k_sizes(8) == (1, 2, 4, 8)
  assert evaluation.pass_at_k_sizes(6) == (1, 2, 4, 6)
  with pytest.raises(ValueError, match="2 source names for 3 problems"):
    evaluation.eval_metrics(np.zeros(6), np.zeros(6), ["a", "b"], num_samples=2,
                            threshold=1.0)


def test_source_names_come_from_the_rows_or_the_kind():
  mmath = sources.Problem("m/1", "math", "q", {"answer": "1"}, {"data_source": "AIME2024"})
  parquet = sources.Problem("d/1", "code", "q", {}, {"dataset": "lcb/v6 hard"})
  plain = sources.Problem("p/1", "code", "q", {}, {"platform": "atcoder"})
  assert source_splits.source_name(mmath, "mmath") == "AIME2024"
  assert source_splits.source_name(parquet, "mopd_parquet") == "lcb_v6_hard"
  assert source_splits.source_name(plain, "livecodebench") == "livecodebench"
  rows = source_splits.text_examples([mmath, plain], "heldout", "mmath")
  assert [r["source"] for r in rows] == ["AIME2024", "mmath"]


def test_cache_keeps_the_source_names(tmp_path):
  split = cache.TokenizedSplit(example_id=np.array([4, 9]),
                               prompts=[np.array([5, 6], np.int32), np.array([8], np.int32)],
                               insert_index=np.array([1, 0]), references=["{}", "{}"],
                               meta={"task": "mopd_math"}, sources=["aime_2024", "hmmt"])
  path = str(tmp_path / "x.npz")
  cache.write(path, split)
  assert cache.read(path).source_table() == {4: "aime_2024", 9: "hmmt"}
  # A file written before the names existed is one source named by its task.
  with np.load(path) as f:
    old = {key: f[key] for key in f.files if key != "sources"}
  np.savez(path, **old)
  assert cache.read(path).source_table() == {4: "math", 9: "math"}


def _aime_only_rewards(texts, references):
  """1.0 for the AIME 2024 answers of the fixture (42, 1024), 0.0 for the HMMT one."""
  del texts
  return [result.Result(reward=float(ref["answer"] in ("42", "1024"))) for ref in references]


def test_evaluator_reports_each_source(tiny_base_dir, tmp_path):
  config = tiny_config(tiny_base_dir, name="math", **{
      "data.cache_dir": str(tmp_path / "data"), "eval.num_prompts": 3,
      "eval.num_samples": 2, "sampling.max_response_len": 4, "data.max_prompt_len": 384,
      "data.overlong": "truncate", "data.batch_size": 2})
  s = train.setup(config, score_batch=_aime_only_rewards)
  names = s.eval_batches.split.source_table()
  assert sorted(set(names.values())) == ["aime_2024", "hmmt_feb_2025"]
  evaluator = evaluation.Evaluator(s.settings, s.model_cfg, s.tokenizer, s.eval_batches,
                                   s.host_verifier, s.mesh, s.state_shapes.params)
  got = evaluator(s.init_state().params)
  assert got["eval/aime_2024/num_problems"] == 2 and got["eval/hmmt_feb_2025/num_problems"] == 1
  for k in (1, 2):
    assert got[f"eval/aime_2024/pass@{k}"] == 1.0
    assert got[f"eval/hmmt_feb_2025/pass@{k}"] == 0.0
  assert got["eval/aime_2024/mean@2"] == 1.0 and got["eval/hmmt_feb_2025/mean@2"] == 0.0
  assert got["eval/mean@2"] == pytest.approx(2 / 3)
  assert all(type(v) in (int, float) for v in got.values())  # as metrics.jsonl needs
