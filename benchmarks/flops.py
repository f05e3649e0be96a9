"""Matmul FLOPs of a traced function, counted from its jaxpr with loop trip counts.

XLA's cost analysis (`compiled.cost_analysis()["flops"]`) counts the body of a loop once,
whatever its trip count: the scanned layers, the loss's sequence chunks, the row
micro-batches and the attention's key blocks each count as one iteration, so for this
project's step it undercounts by orders of magnitude (measured on CPU: a `lax.scan` of 10
matmuls reports the FLOPs of one). `matmul_flops` walks the jaxpr instead: every
`dot_general` counts 2 x batch x free x contracted, a scan's body its `length` times, a
`cond` its most expensive branch (so blocks that blockwise attention skips at run time
still count: an upper bound), a while loop's body once (its trip count is data; the
update holds none). Elementwise work (softmax, norms, the optimizer) is left out: it is
small beside the matmuls of a transformer.
"""

from __future__ import annotations

import math

import jax
from jax.extend import core


def _dot_flops(eqn) -> int:
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  (lhs_contract, rhs_contract), (lhs_batch, _) = eqn.params["dimension_numbers"]
  batch = math.prod(lhs[d] for d in lhs_batch)
  contract = math.prod(lhs[d] for d in lhs_contract)
  lhs_free = math.prod(n for d, n in enumerate(lhs) if d not in (*lhs_contract, *lhs_batch))
  rhs_skip = set(rhs_contract) | set(eqn.params["dimension_numbers"][1][1])
  rhs_free = math.prod(n for d, n in enumerate(rhs) if d not in rhs_skip)
  return 2 * batch * contract * lhs_free * rhs_free


def _sub_jaxprs(value):
  if isinstance(value, core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def jaxpr_matmul_flops(jaxpr: core.Jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "cond":
      total += max(jaxpr_matmul_flops(b.jaxpr) for b in eqn.params["branches"])
    else:
      inner = sum(jaxpr_matmul_flops(j) for v in eqn.params.values()
                  for j in _sub_jaxprs(v))
      total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total


def matmul_flops(traced) -> int:
  """FLOPs of the matmuls of a `jax.jit(f).trace(...)` result (or a ClosedJaxpr)."""
  jaxpr = traced if isinstance(traced, core.ClosedJaxpr) else traced.jaxpr
  return jaxpr_matmul_flops(jaxpr.jaxpr)
