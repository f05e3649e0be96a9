"""Teacher-signal alignment against scipy.stats and hand-computed cases."""

import math

import numpy as np
import pytest
from scipy import stats

from mopd_jax.analysis import teacher_signal


def scipy_prompt(scores, rewards):
  success = rewards >= 1.0
  fails = scores[~success]
  auc = np.mean([(s > f) + 0.5 * (s == f) for s in scores[success] for f in fails])
  pairs = [
      (a, b) for a in range(len(scores)) for b in range(len(scores)) if rewards[a] > rewards[b]
  ]
  return {
      "spearman": stats.spearmanr(scores, rewards).statistic,
      "kendall": stats.kendalltau(scores, rewards, variant="b").statistic,
      "pairwise_accuracy": np.mean([scores[a] > scores[b] for a, b in pairs]),
      "auc": auc,
      "point_biserial": stats.pointbiserialr(success, scores).statistic,
  }


def random_prompts(seed, num=12, size=8):
  rng = np.random.default_rng(seed)
  scores, rewards = [], []
  for p in range(num):
    reward = (rng.random(size) < 0.5).astype(np.float64)
    if p % 3 == 0:
      reward = rng.choice([0.0, 0.5, 1.0], size)  # graded rewards with ties
    score = np.round(reward * 0.3 + rng.normal(0.0, 0.5, size), 1)  # ties in scores too
    scores.append(score)
    rewards.append(reward)
  scores.append(np.zeros(4))  # all-equal rewards below: never in the subset
  rewards.append(np.ones(4))
  return scores, rewards


def test_alignment_matches_scipy():
  scores, rewards = random_prompts(0)
  got = teacher_signal.alignment(scores, rewards)
  headline = [
      (s, r) for s, r in zip(scores, rewards) if (r >= 1.0).any() and (r < 1.0).any()
  ]
  assert got["num_prompts"] == len(headline) and 5 <= len(headline) < len(scores)
  per_prompt = [scipy_prompt(s, r) for s, r in headline]
  for name in teacher_signal.METRICS:
    want = np.mean([m[name] for m in per_prompt])
    assert got[name] == pytest.approx(want, rel=1e-12, abs=1e-12), name


def test_prompt_alignment_hand_computed():
  # Rewards 1, 1, 0, 0; scores 0.9, 0.1, 0.5, 0.1 (one tie across classes).
  metrics = teacher_signal.prompt_alignment(
      np.array([0.9, 0.1, 0.5, 0.1]), np.array([1.0, 1.0, 0.0, 0.0])
  )
  # Success-vs-failure comparisons: 0.9 beats both; 0.1 loses to 0.5, ties 0.1.
  assert metrics["auc"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
  # Strict order only: 2 of the 4 reward-ordered pairs.
  assert metrics["pairwise_accuracy"] == pytest.approx(2 / 4)
  # tau-b: concordant 2, discordant 1; untied score pairs 5, untied reward pairs 4.
  assert metrics["kendall"] == pytest.approx((2 - 1) / math.sqrt(5 * 4))


def test_constant_scores_are_left_out_of_correlations_only():
  scores = [np.array([0.3, 0.3, 0.3]), np.array([0.9, 0.2, 0.1])]
  rewards = [np.array([1.0, 0.0, 0.0]), np.array([1.0, 0.0, 0.0])]
  got = teacher_signal.alignment(scores, rewards)
  assert got["num_prompts"] == 2
  # Correlations only from the second prompt; AUC averages 0.5 (all ties) and 1.0.
  assert got["spearman"] == pytest.approx(stats.spearmanr(scores[1], rewards[1]).statistic)
  assert got["auc"] == pytest.approx(0.75)
  assert got["pairwise_accuracy"] == pytest.approx(0.5)


def test_empty_headline_subset():
  got = teacher_signal.alignment([np.array([1.0, 2.0])], [np.array([1.0, 1.0])])
  assert got["num_prompts"] == 0 and math.isnan(got["auc"])
  ci = teacher_signal.bootstrap_ci([np.array([1.0, 2.0])], [np.array([0.0, 0.0])])
  assert all(math.isnan(v) for pair in ci.values() for v in pair)


def test_bootstrap_ci_agrees_with_scipy_bootstrap():
  scores, rewards = random_prompts(1, num=40)
  ci = teacher_signal.bootstrap_ci(scores, rewards, num_resamples=4000, seed=3)
  point = teacher_signal.alignment(scores, rewards)
  headline = [
      scipy_prompt(s, r) for s, r in zip(scores, rewards) if (r >= 1.0).any() and (r < 1.0).any()
  ]
  for name in ("auc", "point_biserial", "pairwise_accuracy"):
    values = np.array([m[name] for m in headline])
    want = stats.bootstrap(
        (values,), np.mean, n_resamples=4000, method="percentile",
        random_state=np.random.default_rng(7),
    ).confidence_interval
    low, high = ci[name]
    assert low < point[name] < high, name
    width = want.high - want.low
    assert abs(low - want.low) < 0.1 * width and abs(high - want.high) < 0.1 * width, name


def test_bootstrap_ci_collapses_without_spread_and_rejects_bad_arguments():
  scores = [np.array([2.0, 1.0, 0.0])] * 5
  rewards = [np.array([1.0, 0.0, 0.0])] * 5
  ci = teacher_signal.bootstrap_ci(scores, rewards, num_resamples=50)
  assert ci["auc"] == (1.0, 1.0)
  with pytest.raises(ValueError, match="confidence.*1.5"):
    teacher_signal.bootstrap_ci(scores, rewards, confidence=1.5)
  with pytest.raises(ValueError, match=r"prompt 1.*\(3,\).*\(2,\)"):
    teacher_signal.alignment(scores[:2], [rewards[0], np.array([1.0, 0.0])])
