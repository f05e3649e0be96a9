"""Diversity of a set of rollouts (e.g. the G responses to one prompt).

- `self_bleu`: mean over responses of the BLEU-4 of each response against all the others
  as references (high = the responses repeat each other).
- `distinct_n`: distinct n-grams / all n-grams over the whole set (distinct-1, distinct-2).
- `unique_response_ratio`: distinct responses / responses (exact string equality).
- `ast_jaccard_distance`: mean over pairs of parseable Python programs of the Jaccard
  distance between their multisets of AST node types.

Text is split on whitespace; pass lists of tokens (e.g. token ids) instead of strings to use
another tokenisation.
"""

from __future__ import annotations

import ast
import collections
import itertools
import math
from typing import Hashable, Sequence, Union

Response = Union[str, Sequence[Hashable]]


def _tokens(response: Response) -> tuple:
  return tuple(response.split()) if isinstance(response, str) else tuple(response)


def _ngrams(tokens: tuple, n: int) -> collections.Counter:
  return collections.Counter(tokens[k : k + n] for k in range(len(tokens) - n + 1))


def bleu(
    hypothesis: Response,
    references: Sequence[Response],
    *,
    max_order: int = 4,
    epsilon: float = 0.1,
) -> float:
  """Sentence BLEU with uniform weights over orders 1..max_order.

  Modified precision p_n = sum over n-grams of min(count, max count in any reference) /
  number of hypothesis n-grams (at least 1). A p_n without any match becomes
  epsilon / that number (Chen and Cherry's smoothing 1), so short responses do not all
  score 0. Brevity penalty exp(1 - r / c) when the hypothesis length c is below the
  closest reference length r (the shorter one on a tie). An empty hypothesis scores 0.
  """
  hyp = _tokens(hypothesis)
  refs = [_tokens(r) for r in references]
  if not refs:
    raise ValueError("bleu needs at least one reference.")
  if not hyp:
    return 0.0
  log_precision = 0.0
  for n in range(1, max_order + 1):
    counts = _ngrams(hyp, n)
    best = collections.Counter()
    for ref in refs:
      best |= _ngrams(ref, n)
    matches = sum(min(c, best[g]) for g, c in counts.items())
    total = max(sum(counts.values()), 1)
    log_precision += math.log((matches if matches else epsilon) / total) / max_order
  closest = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
  brevity = 0.0 if len(hyp) > closest else 1.0 - closest / len(hyp)
  return math.exp(brevity + log_precision)


def self_bleu(responses: Sequence[Response], *, max_order: int = 4) -> float:
  """Mean BLEU of each response against all other responses; needs at least two."""
  if len(responses) < 2:
    raise ValueError(f"self_bleu needs at least two responses; got {len(responses)}.")
  scores = [
      bleu(r, [o for k, o in enumerate(responses) if k != i], max_order=max_order)
      for i, r in enumerate(responses)
  ]
  return sum(scores) / len(scores)


def distinct_n(responses: Sequence[Response], n: int) -> float:
  """Distinct n-grams / all n-grams over the set; 0 when there are no n-grams."""
  if not isinstance(n, int) or n < 1:
    raise ValueError(f"n must be a positive int; got {n!r}.")
  counts = collections.Counter()
  for r in responses:
    counts.update(_ngrams(_tokens(r), n))
  total = sum(counts.values())
  return len(counts) / total if total else 0.0


def unique_response_ratio(responses: Sequence[Response]) -> float:
  """Distinct responses / responses (exact equality); 0 for an empty set."""
  if not responses:
    return 0.0
  return len({r if isinstance(r, str) else tuple(r) for r in responses}) / len(responses)


def _node_types(code: str) -> collections.Counter | None:
  """Multiset of AST node type names of `code`, or None if it does not parse."""
  try:
    tree = ast.parse(code)
  except (SyntaxError, ValueError):
    return None
  return collections.Counter(type(node).__name__ for node in ast.walk(tree))


def ast_jaccard_distance(codes: Sequence[str]) -> float:
  """Mean pairwise Jaccard distance of AST node-type multisets.

  For multisets A, B: 1 - sum_t min(A_t, B_t) / sum_t max(A_t, B_t). Programs that do not
  parse are left out; nan when fewer than two parse.
  """
  parsed = [types for types in map(_node_types, codes) if types is not None]
  if len(parsed) < 2:
    return math.nan
  distances = [
      1.0 - sum((a & b).values()) / sum((a | b).values())
      for a, b in itertools.combinations(parsed, 2)
  ]
  return sum(distances) / len(distances)
