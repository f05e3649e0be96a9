"""Diversity metrics on hand-computed cases."""

import math

import pytest

from mopd_jax.analysis import diversity


def test_bleu_hand_computed():
  assert diversity.bleu("a b c d", ["a b c d"]) == pytest.approx(1.0)
  # p1..p4 = 4/5, 3/4, 2/3, 1/2; equal lengths, no brevity penalty.
  assert diversity.bleu("a b c d e", ["a b c d f"]) == pytest.approx(0.2 ** 0.25)
  # No trigram or 4-gram: both smoothed to 0.1 / 1; brevity exp(1 - 4/2).
  assert diversity.bleu("a b", ["a b c d"]) == pytest.approx(math.exp(-1.0) * 0.1 ** 0.5)
  # Clipped unigrams 1/3; bigrams 0 of 2 -> 0.1/2; trigram 0 of 1 -> 0.1; 4-gram none -> 0.1.
  assert diversity.bleu("the the the", ["the cat"]) == pytest.approx(
      (1 / 3 * 0.05 * 0.1 * 0.1) ** 0.25
  )
  # Clipping takes the largest count in any one reference; the shorter of two equally close
  # reference lengths (2 and 4 for a hypothesis of 3) sets the brevity penalty (none here).
  assert diversity.bleu("a a b", ["a b", "a a x y"], max_order=1) == pytest.approx(1.0)
  assert diversity.bleu("", ["a"]) == 0.0
  with pytest.raises(ValueError, match="reference"):
    diversity.bleu("a", [])


def test_self_bleu():
  assert diversity.self_bleu(["a b c d"] * 3) == pytest.approx(1.0)
  assert diversity.self_bleu(["a b c d e", "a b c d f"]) == pytest.approx(0.2 ** 0.25)
  # Token ids work as well as text.
  assert diversity.self_bleu([[1, 2, 3, 4, 5], [1, 2, 3, 4, 6]]) == pytest.approx(0.2 ** 0.25)
  with pytest.raises(ValueError, match="got 1"):
    diversity.self_bleu(["a"])


def test_distinct_and_unique():
  responses = ["a b a", "a c"]
  assert diversity.distinct_n(responses, 1) == pytest.approx(3 / 5)
  assert diversity.distinct_n(responses, 2) == pytest.approx(1.0)
  assert diversity.distinct_n(["a", "b"], 2) == 0.0
  assert diversity.distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)
  assert diversity.unique_response_ratio(["x", "x", "y", [1, 2], (1, 2)]) == pytest.approx(3 / 5)
  assert diversity.unique_response_ratio([]) == 0.0
  with pytest.raises(ValueError, match="n must.*0"):
    diversity.distinct_n(responses, 0)


def test_ast_jaccard_distance():
  # "x = 1": Module, Assign, Name, Store, Constant.  "f(x)": Module, Expr, Call, Name x2,
  # Load x2.  Shared: Module, one Name -> 2 of a union of 10: distance 0.8.
  codes = ["x = 1", "y = 2", "f(x)", "def broken("]
  assert diversity.ast_jaccard_distance(codes) == pytest.approx((0.0 + 0.8 + 0.8) / 3)
  assert diversity.ast_jaccard_distance(["x = 1", "y = 2"]) == 0.0
  assert math.isnan(diversity.ast_jaccard_distance(["x = 1", "def broken("]))
