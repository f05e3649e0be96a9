"""How well a teacher's scores of candidate responses agree with their verifier rewards.

For each prompt, a set of candidate responses has teacher scores (mean per-token log-prob of
the response under one context variant: base, 1S, 2S1F, random_peer, ...) and verifier
rewards. Per prompt we compare the two with

- `spearman`: Pearson correlation of the average ranks (ties get their mean rank);
- `kendall`: Kendall's tau-b, ``(concordant - discordant) / sqrt((n0 - tx) (n0 - ty))``;
- `pairwise_accuracy`: among response pairs with different rewards, the fraction whose
  scores are ordered strictly the same way (a tied score counts as wrong);
- `auc`: probability that a success outscores a failure, ties counting 0.5;
- `point_biserial`: Pearson correlation of the scores with the 0/1 success label;

and average over the *headline subset*: prompts with at least one success and one failure
(MOPD spec, section 8). A correlation is undefined on a prompt whose scores are all equal;
such a prompt is left out of that metric's average only. Everything is float64 numpy.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

METRICS = ("spearman", "kendall", "pairwise_accuracy", "auc", "point_biserial")


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of `x`, tied values sharing the mean of their ranks."""
  order = np.argsort(x, kind="stable")
  sorted_x = x[order]
  ranks = np.empty(len(x))
  start = 0
  while start < len(x):
    stop = start
    while stop + 1 < len(x) and sorted_x[stop + 1] == sorted_x[start]:
      stop += 1
    ranks[order[start : stop + 1]] = (start + stop) / 2.0 + 1.0
    start = stop + 1
  return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
  """Pearson correlation; nan when either side is constant."""
  dx, dy = x - x.mean(), y - y.mean()
  denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
  return float(dx @ dy) / denominator if denominator > 0.0 else math.nan


def _kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
  """Kendall's tau-b over all pairs; nan when either side is constant."""
  i, j = np.triu_indices(len(x), k=1)
  sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
  untied_x, untied_y = np.sum(sx != 0), np.sum(sy != 0)
  if untied_x == 0 or untied_y == 0:
    return math.nan
  return float(np.sum(sx * sy)) / math.sqrt(float(untied_x) * float(untied_y))


def prompt_alignment(
    scores: np.ndarray, rewards: np.ndarray, *, success_threshold: float = 1.0
) -> dict[str, float]:
  """The five metrics for one prompt (see the module docstring).

  Args:
    scores: float [K] teacher scores of the K candidate responses.
    rewards: float [K] their verifier rewards; a success has reward >= success_threshold.
    success_threshold: reward of a success.

  Returns:
    dict metric -> float; `auc` and `point_biserial` are nan without both a success and a
    failure, `pairwise_accuracy` is nan when all rewards are equal.
  """
  scores = np.asarray(scores, np.float64)
  rewards = np.asarray(rewards, np.float64)
  success = rewards >= success_threshold
  i, j = np.triu_indices(len(scores), k=1)
  reward_order = np.sign(rewards[i] - rewards[j])
  ordered = reward_order != 0
  agree = np.sign(scores[i] - scores[j])[ordered] == reward_order[ordered]
  wins = scores[success][:, None] - scores[~success][None, :]  # [S, F]
  mixed = success.any() and (~success).any()
  return {
      "spearman": _pearson(_average_ranks(scores), _average_ranks(rewards)),
      "kendall": _kendall_tau_b(scores, rewards),
      "pairwise_accuracy": float(agree.mean()) if ordered.any() else math.nan,
      "auc": float(np.mean((wins > 0) + 0.5 * (wins == 0))) if mixed else math.nan,
      "point_biserial": _pearson(scores, success.astype(np.float64)) if mixed else math.nan,
  }


def _headline_table(
    scores: Sequence[np.ndarray], rewards: Sequence[np.ndarray], success_threshold: float
) -> np.ndarray:
  """Per-prompt metrics of the headline subset: float64 [num_prompts, len(METRICS)]."""
  if len(scores) != len(rewards):
    raise ValueError(
        f"scores and rewards must list the same prompts; got {len(scores)} and {len(rewards)}."
    )
  rows = []
  for p, (score, reward) in enumerate(zip(scores, rewards)):
    score, reward = np.asarray(score, np.float64), np.asarray(reward, np.float64)
    if score.ndim != 1 or score.shape != reward.shape:
      raise ValueError(
          f"prompt {p}: scores and rewards must be 1-D of one length; got shapes "
          f"{score.shape} and {reward.shape}."
      )
    success = reward >= success_threshold
    if success.any() and (~success).any():
      metrics = prompt_alignment(score, reward, success_threshold=success_threshold)
      rows.append([metrics[name] for name in METRICS])
  return np.asarray(rows, np.float64).reshape(-1, len(METRICS))


def _mean_ignoring_undefined(table: np.ndarray) -> np.ndarray:
  """Column means over the finite entries; nan for a column without any."""
  finite = np.isfinite(table)
  counts = finite.sum(axis=0)
  sums = np.where(finite, table, 0.0).sum(axis=0)
  return np.where(counts > 0, sums / np.maximum(counts, 1), math.nan)


def alignment(
    scores: Sequence[np.ndarray],
    rewards: Sequence[np.ndarray],
    *,
    success_threshold: float = 1.0,
) -> dict[str, float]:
  """Teacher-score / reward alignment averaged over the headline subset of prompts.

  Args:
    scores: one 1-D float array per prompt, the teacher scores of its candidates.
    rewards: one 1-D float array per prompt, the same length as its scores.
    success_threshold: reward of a success.

  Returns:
    dict with `spearman`, `kendall`, `pairwise_accuracy`, `auc`, `point_biserial`
    (averages over the prompts with at least one success and one failure; nan if there are
    none) and `num_prompts` (how many such prompts, an int).
  """
  table = _headline_table(scores, rewards, success_threshold)
  result = dict(zip(METRICS, (float(v) for v in _mean_ignoring_undefined(table))))
  result["num_prompts"] = int(table.shape[0])
  return result


def bootstrap_ci(
    scores: Sequence[np.ndarray],
    rewards: Sequence[np.ndarray],
    *,
    success_threshold: float = 1.0,
    num_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
  """Prompt-level percentile bootstrap confidence intervals of `alignment`'s averages.

  Prompts of the headline subset are resampled with replacement `num_resamples` times; each
  resample's average (over its finite entries, as in `alignment`) gives one draw.

  Returns:
    dict metric -> (low, high), the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles
    of the draws; (nan, nan) when the subset is empty.
  """
  if not isinstance(num_resamples, int) or num_resamples < 1:
    raise ValueError(f"num_resamples must be a positive int; got {num_resamples!r}.")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1); got {confidence!r}.")
  table = _headline_table(scores, rewards, success_threshold)
  if table.shape[0] == 0:
    return {name: (math.nan, math.nan) for name in METRICS}
  rng = np.random.default_rng(seed)
  picks = rng.integers(0, table.shape[0], (num_resamples, table.shape[0]))
  draws = np.stack([_mean_ignoring_undefined(table[pick]) for pick in picks])  # [R, M]
  tail = (1.0 - confidence) / 2.0
  low = np.nanquantile(draws, tail, axis=0)
  high = np.nanquantile(draws, 1.0 - tail, axis=0)
  return {name: (float(lo), float(hi)) for name, lo, hi in zip(METRICS, low, high)}
