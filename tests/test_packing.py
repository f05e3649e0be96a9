"""Padding-free update (config.optim.packed_tokens): the packing itself, and the loss,
gradient and per-token log-probs of packed rows against the padded path's."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopd_jax import losses, packing, settings, step_teacher, train, train_step
from tests.conftest import load_config, sampled_rollouts, tiny_config


# ----------------------------------------------------------------------- First-fit decreasing.

def test_first_fit_decreasing_places_like_the_host_and_never_overlaps():
  rng = np.random.default_rng(0)
  ffd = jax.jit(packing.first_fit_decreasing, static_argnums=1)
  for capacity in (10, 37):
    lengths = rng.integers(0, capacity + 1, size=23)
    lengths[3] = lengths[7] = lengths[11]  # ties are placed in row order
    bins, offsets, segments, used = jax.device_get(ffd(jnp.asarray(lengths), capacity))
    np.testing.assert_array_equal(bins[lengths > 0],
                                  packing.first_fit_decreasing_np(lengths, capacity)[lengths > 0])
    assert used == packing.rows_needed_np(lengths, capacity)
    for b in np.unique(bins[lengths > 0]):
      items = np.flatnonzero((bins == b) & (lengths > 0))
      items = items[np.argsort(offsets[items])]
      ends = offsets[items] + lengths[items]
      assert ends[-1] <= capacity
      assert np.all(offsets[items][1:] >= ends[:-1])  # no overlap
      assert np.all(np.diff(segments[items]) > 0)  # ids rise along the row
    # A budget of 2 bins: packing into only 2 bins (host, items that find no room are
    # left out) leaves out exactly the items placed in bins >= 2, the rest in the same bins.
    assert used > 2
    free, limited = [capacity, capacity], np.full(len(lengths), -1)
    for item in np.argsort(-lengths, kind="stable"):
      for b in range(2):
        if free[b] >= lengths[item]:
          free[b] -= lengths[item]
          limited[item] = b
          break
    np.testing.assert_array_equal(np.where(bins < 2, bins, -1), limited)


# ----------------------------------------------------------------------- The layouts.

def _synthetic_rows(rng, n, lp, ltp, lr):
  """Left-padded prompts and teacher prompts, right-padded responses of varied lengths."""
  def left_padded(width, lo):
    lengths = rng.integers(lo, width + 1, size=n)
    mask = np.arange(width)[None] >= (width - lengths)[:, None]
    return rng.integers(3, 50, size=(n, width)) * mask, mask

  p_tok, p_mask = left_padded(lp, 1)
  t_tok, t_mask = left_padded(ltp, 2)
  r_len = rng.integers(0, lr + 1, size=n)
  r_mask = np.arange(lr)[None] < r_len[:, None]
  responses = rng.integers(3, 50, size=(n, lr)) * r_mask
  return p_tok, p_mask, t_tok, t_mask, responses, r_mask


@pytest.mark.parametrize("mode", losses.AGGREGATION_MODES)
def test_packed_layouts_keep_every_token_its_row_weight_and_predecessor(mode):
  """Two micro-batches of 16 rows on 2 batch shards: every response token's loss slot holds
  its target, its row's whole-batch weight (so the weighted sum is the padded one in each
  aggregation mode) and indices of the student / teacher slots holding the token before it,
  whose segment position equals the padded path's RoPE position."""
  rng = np.random.default_rng(1)
  n, lp, ltp, lr, num, shards = 32, 5, 9, 7, 2, 2
  p_tok, p_mask, t_tok, t_mask, responses, r_mask = _synthetic_rows(rng, n, lp, ltp, lr)
  weights = np.asarray(losses.aggregation_weights(jnp.asarray(r_mask), mode))
  sampler = rng.standard_normal((n, lr)).astype(np.float32)
  seqs = {"student_tokens": np.concatenate([p_tok, responses], 1),
          "student_mask": np.concatenate([p_mask, r_mask], 1),
          "teacher_tokens": np.concatenate([t_tok, responses], 1),
          "teacher_mask": np.concatenate([t_mask, r_mask], 1),
          "responses": responses, "response_mask": r_mask, "weights": weights,
          "sampler_logp": sampler}
  by_mb = jax.tree.map(lambda x: jnp.asarray(x), train_step._to_micro_batches(seqs, num))
  ls = lp + lr
  pack = jax.jit(lambda x: packing.pack(x, prompt_len=lp, teacher_prompt_len=ltp,
                                        packed_tokens=14 * ls, shards=shards, pad_id=0,
                                        packed_teacher_tokens=12 * (ltp + lr)))
  packed = jax.device_get(pack(by_mb))
  rows = packed.rows
  assert rows.student_tokens.shape == (num, 14, ls) and rows.targets.shape == (num, 14, lr)
  assert rows.teacher_tokens.shape == (num, 12, ltp + lr)
  assert packed.overflow_rows == 0
  assert packed.rows_needed == 14 and packed.teacher_rows_needed == 12
  back = lambda x: np.asarray(train_step._from_micro_batches(  # noqa: E731
      packing.unpack(jnp.asarray(x), packed)))
  np.testing.assert_array_equal(back(rows.targets), responses * r_mask)
  np.testing.assert_array_equal(back(rows.weights), weights * r_mask)
  np.testing.assert_array_equal(back(rows.sampler_logp), sampler * r_mask)
  np.testing.assert_allclose(rows.weights.sum(), weights.sum(), rtol=1e-6)
  for layout, prompt_len, tok, mask in (("student", lp, p_tok, p_mask),
                                        ("teacher", ltp, t_tok, t_mask)):
    seq = np.concatenate([tok, responses], 1)
    seq_mask = np.concatenate([mask, r_mask], 1)
    pos = np.maximum(np.cumsum(seq_mask, 1) - 1, 0)
    index = back(getattr(rows, f"{layout}_index"))
    packed_tok = getattr(rows, f"{layout}_tokens")
    packed_pos = getattr(rows, f"{layout}_positions")
    for i in range(n):
      mb, j = i % num, i // num
      shard = j // (n // num // shards)
      per_shard = packed_tok.shape[1] // shards
      for t in np.flatnonzero(r_mask[i]):
        flat = index[i, t]
        r, c = shard * per_shard + flat // packed_tok.shape[2], flat % packed_tok.shape[2]
        assert packed_tok[mb, r, c] == seq[i, prompt_len - 1 + t]
        assert packed_pos[mb, r, c] == pos[i, prompt_len - 1 + t]


def test_budget_errors_name_the_knob():
  with pytest.raises(settings.ConfigError,
                     match=r"optim.packed_tokens = 100.*multiple of 80; nearest: \[80, 160\]"):
    packing.packed_rows(100, 40, 8, 2)
  with pytest.raises(settings.ConfigError, match=r"packed_tokens = 400.*10 packed rows.*8 "
                     r"padded rows.*at most 320"):
    packing.packed_rows(400, 40, 8, 1)
  assert packing.packed_rows(160, 40, 8, 2) == 4
  with pytest.raises(settings.ConfigError, match=r"packed_tokens = 640 with "
                     r"config.algorithm.name = 'grpo'.*\(mopd, sdpo, opd\)"):
    settings.from_config(load_config(**{"optim.packed_tokens": 640,
                                        "algorithm.name": "grpo"}))
  settings.from_config(load_config(**{"optim.packed_tokens": 640}))


def test_overflow_stops_the_run_with_the_budget_needed():
  st = settings.from_config(load_config(**{"optim.packed_tokens": 640}))
  train.check_packed_budget(st, {"train/packed_overflow_rows": 0}, 3)
  with pytest.raises(settings.ConfigError, match=r"step 3 did not fit.*optim.packed_tokens = "
                     r"640 \(needed >= 880\).*update was skipped"):
    train.check_packed_budget(st, {"train/packed_overflow_rows": 2,
                                   "train/packed_tokens_needed": 880,
                                   "train/packed_teacher_tokens_needed": 900}, 3)
  st = settings.from_config(load_config(**{"optim.packed_tokens": 640,
                                           "optim.packed_teacher_tokens": 1000}))
  with pytest.raises(settings.ConfigError, match=r"fit its packed budget: config.optim."
                     r"packed_teacher_tokens = 1000 \(needed >= 1200\)\. The update"):
    train.check_packed_budget(st, {"train/packed_overflow_rows": 1,
                                   "train/packed_tokens_needed": 600,
                                   "train/packed_teacher_tokens_needed": 1200}, 3)
  with pytest.raises(settings.ConfigError, match=r"packed_teacher_tokens = 1000 with "
                     r"config.optim.packed_tokens = 0"):
    settings.from_config(load_config(**{"optim.packed_teacher_tokens": 1000}))


def test_proposed_budgets_follow_the_lengths():
  # Every sequence fills half a row: two per packed row, on each of 2 shards.
  half = np.full(64, 20)
  assert packing.propose_budgets(half, half, half // 2, student_row=40, teacher_row=40,
                                 response_row=20, micro_batch_rows=8,
                                 shards=2) == (4 * 40, 4 * 40)
  # Long-tailed responses (mean 35% of the cap), teacher prompts with a peer context of
  # three long-tailed blocks: fewer rows than padded, more than the mean would suggest,
  # the same on every call (seeded).
  rng = np.random.default_rng(0)
  tail = lambda size: np.minimum(rng.exponential(35, size).astype(int) + 1, 100)  # noqa: E731
  resp, prompt = tail(500), rng.integers(20, 41, 500)
  teacher = prompt + tail((500, 3)).sum(1) + resp
  args = (prompt + resp, teacher, resp)
  kw = dict(student_row=140, teacher_row=440, response_row=100, micro_batch_rows=32)
  student_budget, teacher_budget = packing.propose_budgets(*args, **kw)
  assert (student_budget, teacher_budget) == packing.propose_budgets(*args, **kw)
  assert student_budget % 140 == 0 and teacher_budget % 440 == 0
  assert (prompt + resp).mean() * 32 < student_budget < 32 * 140
  assert teacher.mean() * 32 < teacher_budget < 32 * 440
  low = packing.propose_budgets(*args, quantile=0.5, **kw)
  assert low[0] <= student_budget and low[1] <= teacher_budget


# ----------------------------------------------------------------------- Against the padded path.

@pytest.fixture(scope="module")
def step_case(tiny_base_dir):
  """One batch of the tiny demo model with responses cut to varied lengths (as a sampler
  that stopped early leaves them), so that packed rows hold several sequences; the
  trust-region teacher (two teacher terms) and the rollout correction are on."""
  config = tiny_config(tiny_base_dir, **{"teacher.mode": "trust_region"})
  s = train.setup(config)
  state = s.init_state()
  batch = s.train_batches.batch(0)
  rollouts, peer_key = sampled_rollouts(s, state, batch)
  lengths = np.array([28, 3, 11, 1, 20, 6, 28, 2, 15, 9, 4, 27, 7, 13, 5, 1], np.int32)
  rollouts = rollouts.replace(lengths=np.minimum(rollouts.lengths, lengths),
                              finished=rollouts.finished & (rollouts.lengths <= lengths))
  return s, state, batch, rollouts, peer_key


def _packed_cfg(s, packed_tokens, micro_batch_rows, packed_teacher_tokens=0):
  return dataclasses.replace(s.step_cfg, optim=dataclasses.replace(
      s.step_cfg.optim, packed_tokens=packed_tokens, micro_batch_rows=micro_batch_rows,
      packed_teacher_tokens=packed_teacher_tokens))


def test_packed_loss_and_gradient_equal_the_padded_path(step_case):
  s, state, batch, rollouts, peer_key = step_case

  @jax.jit
  def both(state, batch, rollouts, peer_key):
    inputs = step_teacher.build_teacher_inputs(s.step_cfg, s.pieces, batch, rollouts, peer_key)
    padded = train_step.loss_and_grads(s.step_cfg, state, inputs, rollouts)
    student_row = inputs.prompt_tokens.shape[1] + rollouts.tokens.shape[1]
    teacher_row = inputs.teacher_tokens.shape[1] + rollouts.tokens.shape[1]
    # 8 rows per micro-batch -> 6 packed student rows, 5 teacher rows.
    cfg = _packed_cfg(s, 6 * student_row, 8, 5 * teacher_row)
    packed = train_step.packed_loss_and_grads(cfg, state, inputs, rollouts)
    return padded, packed[:4], train_step.packing_metrics(cfg, inputs, rollouts, packed[4]), \
        inputs.response_mask

  padded, packed, metrics, response_mask = jax.device_get(both(state, batch, rollouts,
                                                               peer_key))
  assert metrics["train/packed_overflow_rows"] == 0
  assert metrics["train/packed_fill_student"] > 0.5  # several sequences per packed row
  loss, grads, s_logp, t_logp = padded
  assert loss > 0
  np.testing.assert_allclose(packed[0], loss, rtol=1e-5)
  m = response_mask
  np.testing.assert_allclose(packed[2] * m, s_logp * m, atol=2e-5)
  np.testing.assert_allclose(packed[3] * m, t_logp * m, atol=2e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads))
  assert scale > 1e-6
  for a, b in zip(jax.tree.leaves(packed[1]), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_a_batch_over_budget_skips_the_update(step_case):
  s, state, batch, rollouts, peer_key = step_case
  student_row = s.step_cfg.sampling.max_response_len + batch["prompt_tokens"].shape[1]
  cfg = _packed_cfg(s, 2 * student_row, 0)  # 16 rows into 2: cannot fit
  new_state, metrics = jax.device_get(jax.jit(
      lambda st, b, r, k: train_step.update(cfg, s.optimizer, s.pieces, st, b, r, k))(
          state, batch, rollouts, peer_key))
  assert metrics["train/packed_overflow_rows"] > 0
  assert metrics["train/packed_tokens_needed"] > 2 * student_row
  assert metrics["train/packed_tokens_needed"] % student_row == 0
  assert not metrics["train/skipped_nonfinite"]
  for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(a, b)
  assert new_state.step == state.step + 1


def test_matmul_flops_count_every_loop_iteration():
  """The FLOPs the packing study reports: a scan's body counts `length` times (XLA's cost
  analysis counts it once), a cond its larger branch."""
  from benchmarks import flops  # pylint: disable=import-outside-toplevel

  def fn(x, w):
    y = jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=10)[0]
    return jax.lax.cond(y.sum() > 0, lambda a: a @ w @ w, lambda a: a, y)

  x, w = jnp.ones((4, 8)), jnp.ones((8, 8))
  assert flops.matmul_flops(jax.make_jaxpr(fn)(x, w)) == 12 * 2 * 4 * 8 * 8
  compiled = jax.jit(fn).lower(x, w).compile().cost_analysis()
  compiled = compiled[0] if isinstance(compiled, (list, tuple)) else compiled
  assert compiled["flops"] < 4 * 2 * 4 * 8 * 8  # the body once, not ten times
