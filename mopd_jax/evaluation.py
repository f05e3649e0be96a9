"""Held-out evaluation: unbiased pass@k, the held-out metrics and the evaluator.

The metrics are pure functions of host arrays (tested against brute force); `Evaluator`
samples the same held-out prompts with the same key at every evaluation, through the split
pipeline (jit(sample) -> host verify), so that before/after numbers differ only through
the parameters.
"""

from __future__ import annotations

import math

import jax
from jax.experimental import multihost_utils
import numpy as np

from mopd_jax import settings, sharding
from mopd_jax.sampling import Sampler, sampler_layout
from mopd_jax.verifiers import callback


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
  if n - c < k:
    return 1.0
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_k_sizes(n: int) -> tuple:
  """The k of the pass@k metrics for n samples: 1, 2, 4, ... up to n, and n itself."""
  return tuple(sorted({1 << i for i in range(n.bit_length()) if 1 << i <= n} | {n}))


def eval_metrics(rewards, status, sources, *, num_samples: int, threshold: float) -> dict:
  """Held-out metrics over all problems and per source (a pure function of host arrays).

  Args:
    rewards: float [P * n], the n = `num_samples` rollouts of each problem in a row.
    status: int [P * n], verifier status codes (`callback.STATUS_CODES`).
    sources: str [P], the source name of each problem.
    num_samples: n.
    threshold: a rollout succeeds when its reward is >= threshold.

  Returns:
    `eval/mean@n` (mean reward), `eval/pass@k` (unbiased, averaged over problems) for k in
    `pass_at_k_sizes(n)`, `eval/success_rate`, `eval/verifier_errors`, and per source
    `eval/<source>/mean@n`, `eval/<source>/pass@k` and `eval/<source>/num_problems`.
  """
  n = num_samples
  rewards = np.asarray(rewards, np.float64).reshape(-1, n)
  sources = np.asarray(sources, dtype=str)
  if len(sources) != len(rewards):
    raise ValueError(f"{len(sources)} source names for {len(rewards)} problems of "
                     f"{n} rollouts each.")
  correct = (rewards >= threshold).sum(1)

  def group(prefix, rows):
    out = {f"{prefix}mean@{n}": float(rewards[rows].mean())}
    for k in pass_at_k_sizes(n):
      out[f"{prefix}pass@{k}"] = float(np.mean([pass_at_k(n, int(c), k)
                                                for c in correct[rows]]))
    return out

  out = group("eval/", slice(None))
  out["eval/success_rate"] = float(correct.sum() / rewards.size)
  out["eval/verifier_errors"] = int((np.asarray(status) == callback.STATUS_CODES["error"]).sum())
  for name in sorted(set(sources.tolist())):
    rows = sources == name
    out.update(group(f"eval/{name}/", rows))
    out[f"eval/{name}/num_problems"] = int(rows.sum())
  return out


class Evaluator:
  """Held-out evaluation through the split pipeline: jit(sample) -> host verify.

  The same prompts and the same sampling key every time, so before/after numbers differ
  only through the parameters. Prompts are split over the mesh like training batches;
  each process verifies the rollouts of its own rows, and the per-row results (with the
  example ids, which name each problem's source) are gathered so every process computes
  the same metrics (`eval_metrics`).
  """

  def __init__(self, st: settings.Settings, model_cfg, tok, batches, host_verifier, mesh,
               param_shapes):
    e = st.eval
    self.sampler = Sampler(model=model_cfg, max_new_tokens=st.sampling.max_response_len,
                           stop_ids=tuple(tok.stop_ids), pad_id=tok.pad_id,
                           temperature=e.temperature, top_k=e.top_k, top_p=e.top_p,
                           num_samples=e.num_samples,
                           decode_layers=st.sampling.decode_layers,
                           decode_layout=sampler_layout(st.sampling.decode_layout))
    local = batches.first(e.num_prompts, sharding.process_rows(mesh, e.num_prompts))
    self.local_ids = local["example_id"]
    self.sources = batches.split.source_table()
    self.batch = sharding.global_batch(mesh, local, e.num_prompts)
    self.k = e.num_samples
    self.host = host_verifier
    self.threshold = st.verifier.success_threshold
    key = jax.random.fold_in(jax.random.PRNGKey(st.run.seed), 1_000_003)
    self.key = jax.make_array_from_process_local_data(sharding.replicated(mesh),
                                                      np.asarray(key))
    with jax.set_mesh(mesh):  # the sampler's constraints need the mesh while traced
      out_shapes = jax.eval_shape(self.sampler.__call__, param_shapes,
                                  self.batch["prompt_tokens"], self.batch["prompt_mask"],
                                  self.key)
    self._sample = sharding.UnderMesh(jax.jit(
        self.sampler.__call__, out_shardings=jax.tree.map(
            lambda x: sharding.batch_sharding(mesh, x.ndim), out_shapes)), mesh)

  def __call__(self, params) -> dict:
    out = self._sample(params, self.batch["prompt_tokens"], self.batch["prompt_mask"],
                       self.key)
    ids = np.repeat(self.local_ids, self.k)
    rewards, status, _, _ = self.host(ids, sharding.local_rows(out.tokens),
                                      sharding.local_rows(out.lengths))
    self.host.pop_timing()  # evaluation is not part of a training step's statistics
    if jax.process_count() > 1:
      # Each block holds whole groups of k rows, so the metrics below do not depend on
      # the order of the blocks; the ids travel with them and name each group's source.
      rewards, status, ids = multihost_utils.process_allgather(
          (rewards, status, np.asarray(ids, np.int32)), tiled=True)
    sources = [self.sources[int(i)] for i in np.asarray(ids)[::self.k]]
    return eval_metrics(rewards, status, sources, num_samples=self.k,
                        threshold=self.threshold)
