"""Baseline losses (GRPO, DPO, SimPO, verified SFT, group pairs) against float64 numpy."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopd_jax import losses


def np_log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


# ----------------------------------------------------------------------------- GRPO


@pytest.mark.parametrize("normalize_std", [False, True])
def test_grpo_advantages_match_reference(normalize_std):
  rng = np.random.default_rng(0)
  rewards = rng.integers(0, 2, (6, 5)).astype(np.float64)
  rewards[1] = 1.0  # constant group: advantage 0
  rewards[2] = rng.random(5)  # graded rewards
  got = np.asarray(
      jax.jit(losses.grpo_advantages, static_argnames="normalize_std")(
          jnp.asarray(rewards, jnp.float32), normalize_std=normalize_std
      )
  )
  want = np.zeros_like(rewards)
  for b, row in enumerate(rewards):
    mean = sum(row) / len(row)
    centred = row - mean
    if normalize_std:
      var = sum((r - mean) ** 2 for r in row) / (len(row) - 1)
      centred = centred / (np.sqrt(var) + 1e-6)
    want[b] = centred
  assert got.dtype == np.float32 and got.shape == rewards.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[1], 0.0)


def test_grpo_advantages_of_single_rollout_groups_are_zero():
  rewards = jnp.asarray([[1.0], [0.0]])
  for normalize_std in (False, True):
    got = losses.grpo_advantages(rewards, normalize_std=normalize_std)
    np.testing.assert_array_equal(got, [[0.0], [0.0]])


def np_grpo(logp, old_logp, adv, clip_low, clip_high, dual_clip):
  """Float64 loop over tokens, straight from the formula."""
  out = np.zeros(logp.shape)
  for n, t in itertools.product(range(logp.shape[0]), range(logp.shape[1])):
    a = float(adv[n])
    r = np.exp(float(logp[n, t]) - float(old_logp[n, t]))
    l1 = -a * r
    l2 = -a * min(max(r, 1 - clip_low), 1 + clip_high)
    loss = max(l1, l2)
    if dual_clip is not None and a < 0:
      loss = min(loss, -a * dual_clip)
    out[n, t] = loss
  return out


GRPO_CLIPS = [(0.2, 0.28, 3.0), (0.1, 0.1, 1.5), (0.2, 0.28, None)]


@pytest.mark.parametrize("clip_low,clip_high,dual_clip", GRPO_CLIPS)
def test_grpo_per_token_matches_reference(clip_low, clip_high, dual_clip):
  rng = np.random.default_rng(1)
  n, length = 8, 7
  old = rng.normal(-2.0, 1.0, (n, length))
  # Log-ratios up to +-3 put ratios well outside the clip range and beyond the dual clip.
  logp = old + rng.uniform(-3.0, 3.0, (n, length))
  adv = rng.normal(0.0, 1.0, n)
  adv[0], adv[1] = 0.0, -0.5
  logp[1, :3] = old[1, :3] + np.log([5.0, 2.0, 0.5])  # A < 0: dual clip, clip, below clip
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  kwargs = dict(clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
  step = jax.jit(lambda a, b, c: losses.grpo_per_token(a, b, c, **kwargs))
  got = np.asarray(step(f32(logp), f32(old), f32(adv)))
  want = np_grpo(
      np.float32(logp).astype(np.float64), np.float32(old).astype(np.float64),
      np.float32(adv).astype(np.float64), clip_low, clip_high, dual_clip,
  )
  assert got.shape == (n, length) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  if dual_clip == 3.0:
    # Ratio 5 with A = -0.5: the plain PPO loss 2.5 is capped at 1.5.
    assert got[1, 0] == pytest.approx(1.5, rel=1e-6)


def test_grpo_gradient_is_zero_where_clipped():
  logp = jnp.log(jnp.asarray([[1.5, 1.0, 0.5, 5.0]]))
  old = jnp.zeros((1, 4))

  def total(lp, a):
    return losses.grpo_per_token(lp, old, a).sum()

  grad_pos = np.asarray(jax.grad(total)(logp, jnp.asarray([1.0])))
  grad_neg = np.asarray(jax.grad(total)(logp, jnp.asarray([-1.0])))
  # A > 0: ratio 1.5 is clipped (no gradient), 1.0 and 0.5 are not, 5.0 is clipped.
  np.testing.assert_allclose(grad_pos, [[0.0, -1.0, -0.5, 0.0]], atol=1e-6)
  # A < 0: 1.5 and 1.0 unclipped (l = r), 0.5 clipped at 0.8, 5.0 capped by the dual clip.
  np.testing.assert_allclose(grad_neg, [[1.5, 1.0, 0.0, 0.0]], atol=1e-6)


def test_grpo_rejects_bad_arguments():
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="clip_low.*1.2"):
    losses.grpo_per_token(x, x, jnp.zeros(2), clip_low=1.2)
  with pytest.raises(ValueError, match="dual_clip.*0.5"):
    losses.grpo_per_token(x, x, jnp.zeros(2), dual_clip=0.5)
  with pytest.raises(ValueError, match=r"advantages.*\(3,\)"):
    losses.grpo_per_token(x, x, jnp.zeros(3))
  with pytest.raises(ValueError, match=r"\(4,\)"):
    losses.grpo_advantages(jnp.zeros(4))


# ----------------------------------------------------------------------------- DPO / SimPO


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_loss_matches_reference(beta):
  rng = np.random.default_rng(2)
  c, r, rc, rr = (rng.normal(-40.0, 15.0, 9) for _ in range(4))
  got = np.asarray(
      jax.jit(lambda *a: losses.dpo_loss(*a, beta=beta))(
          *(jnp.asarray(x, jnp.float32) for x in (c, r, rc, rr))
      )
  )
  c, r, rc, rr = (np.float32(x).astype(np.float64) for x in (c, r, rc, rr))
  want = np.array([
      np.log1p(np.exp(-beta * ((c[p] - rc[p]) - (r[p] - rr[p])))) for p in range(9)
  ])
  assert got.shape == (9,) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  # No preference change relative to the reference: log 2.
  same = losses.dpo_loss(jnp.ones(1), jnp.ones(1), jnp.ones(1), jnp.ones(1))
  np.testing.assert_allclose(same, [np.log(2.0)], rtol=1e-6)


@pytest.mark.parametrize(
    "beta,gamma,label_smoothing", [(2.0, 1.0, 0.0), (2.0, 1.0, 0.1), (0.5, -0.3, 0.5)]
)
def test_simpo_loss_matches_reference(beta, gamma, label_smoothing):
  rng = np.random.default_rng(3)
  p = 10
  chosen_len = rng.integers(1, 30, p)
  rejected_len = rng.integers(1, 30, p)
  chosen = -rng.uniform(0.1, 2.0, p) * chosen_len
  rejected = -rng.uniform(0.1, 2.0, p) * rejected_len
  got = np.asarray(
      jax.jit(
          lambda *a: losses.simpo_loss(
              *a, beta=beta, gamma=gamma, label_smoothing=label_smoothing
          )
      )(
          jnp.asarray(chosen, jnp.float32), jnp.asarray(rejected, jnp.float32),
          jnp.asarray(chosen_len, jnp.int32), jnp.asarray(rejected_len, jnp.int32),
      )
  )
  chosen, rejected = np.float32(chosen).astype(np.float64), np.float32(rejected).astype(np.float64)
  want = []
  for i in range(p):
    m = beta * (chosen[i] / chosen_len[i] - rejected[i] / rejected_len[i]) - gamma
    sig = 1.0 / (1.0 + np.exp(-m))
    want.append(-(1 - label_smoothing) * np.log(sig) - label_smoothing * np.log(1 - sig))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


def test_simpo_and_dpo_reject_bad_arguments():
  x = jnp.zeros(3)
  with pytest.raises(ValueError, match="label_smoothing.*0.7"):
    losses.simpo_loss(x, x, x, x, label_smoothing=0.7)
  with pytest.raises(ValueError, match="beta.*-1"):
    losses.dpo_loss(x, x, x, x, beta=-1.0)
  with pytest.raises(ValueError, match="rejected_logp"):
    losses.dpo_loss(x, jnp.zeros(4), x, x)


# ----------------------------------------------------------------------------- verified SFT


def test_verified_sft_matches_reference():
  rng = np.random.default_rng(4)
  n, length = 6, 8
  logp = -rng.uniform(0.0, 4.0, (n, length))
  lengths = np.array([8, 3, 0, 5, 8, 1])
  mask = np.arange(length)[None, :] < lengths[:, None]
  logp[~mask] = np.nan  # padding never leaks
  rewards = np.array([1.0, 1.0, 1.0, 0.0, 0.5, 1.0])
  loss, verified = jax.jit(lambda *a: losses.verified_sft_per_token(*a, threshold=1.0))(
      jnp.asarray(logp, jnp.float32), jnp.asarray(mask), jnp.asarray(rewards, jnp.float32)
  )
  loss, verified = np.asarray(loss), np.asarray(verified)
  # Row 2 passes the threshold but has no tokens: not verified.
  np.testing.assert_array_equal(verified, [True, True, False, False, False, True])
  logp64 = np.float32(logp).astype(np.float64)
  nll = [-np.mean(logp64[i, : lengths[i]]) for i in (0, 1, 5)]
  assert np.isfinite(loss).all()
  np.testing.assert_allclose(loss.sum(axis=1)[[0, 1, 5]], nll, rtol=1e-5)
  np.testing.assert_array_equal(loss[[2, 3, 4]], 0.0)
  np.testing.assert_array_equal(loss[~mask], 0.0)
  batch_loss = loss.sum() / max(verified.sum(), 1)
  np.testing.assert_allclose(batch_loss, np.mean(nll), rtol=1e-5)
  # Gradient: d loss / d logp = -1 / length on verified tokens.
  grad = np.asarray(
      jax.grad(lambda lp: losses.verified_sft_per_token(
          lp, jnp.asarray(mask), jnp.asarray(rewards, jnp.float32))[0].sum()
      )(jnp.asarray(np.nan_to_num(logp), jnp.float32))
  )
  np.testing.assert_allclose(grad[0], -1.0 / 8)
  np.testing.assert_allclose(grad[1, :3], -1.0 / 3)
  np.testing.assert_array_equal(grad[[2, 3, 4]], 0.0)


def test_verified_sft_threshold():
  logp = jnp.full((2, 2), -1.0)
  mask = jnp.ones((2, 2), bool)
  _, verified = losses.verified_sft_per_token(logp, mask, jnp.asarray([0.5, 0.4]), threshold=0.5)
  np.testing.assert_array_equal(verified, [True, False])
  with pytest.raises(ValueError, match=r"rewards.*\(3,\)"):
    losses.verified_sft_per_token(logp, mask, jnp.zeros(3))


# ----------------------------------------------------------------------------- pairs


def reference_pairs(rewards):
  """Every (a, b) with r_a > r_b per group, ordered by (min(a, b), max(a, b))."""
  out = []
  for b, row in enumerate(rewards):
    group = len(row)
    pairs = []
    for lo, hi in itertools.combinations(range(group), 2):
      if row[lo] > row[hi]:
        pairs.append((b * group + lo, b * group + hi))
      elif row[hi] > row[lo]:
        pairs.append((b * group + hi, b * group + lo))
    out.append(pairs)
  return out


def test_group_pairs_match_reference():
  rng = np.random.default_rng(5)
  group = 5
  rewards = rng.integers(0, 2, (7, group)).astype(np.float32)
  rewards[0] = 1.0  # all success: empty
  rewards[1] = 0.0  # all failure: empty
  rewards[2] = [0.5, 0.25, 0.5, 1.0, 0.0]  # graded with a tie
  rewards[3] = [0.0, 1.0, 0.0, 0.0, 0.0]
  got = jax.jit(losses.group_pairs)(jnp.asarray(rewards))
  num_slots = group * (group - 1) // 2
  for field in (got.chosen, got.rejected, got.valid):
    assert field.shape == (7, num_slots)
  assert got.chosen.dtype == jnp.int32 and got.valid.dtype == jnp.bool_
  want = reference_pairs(rewards)
  for b, pairs in enumerate(want):
    k = len(pairs)
    assert int(got.num_pairs[b]) == k
    chosen, rejected = np.asarray(got.chosen[b, :k]), np.asarray(got.rejected[b, :k])
    assert list(zip(chosen.tolist(), rejected.tolist())) == pairs
    np.testing.assert_array_equal(got.valid[b], np.arange(num_slots) < k)
    np.testing.assert_array_equal(got.chosen[b, k:], -1)
    np.testing.assert_array_equal(got.rejected[b, k:], -1)
  assert int(got.num_empty_groups) == sum(not pairs for pairs in want)
  assert int(got.num_empty_groups) >= 2
  assert int(got.num_pairs[2]) == 9  # 10 pairs, one tie
  assert int(got.num_pairs[3]) == 4


def test_dpo_on_group_pairs_end_to_end():
  """Pairs gathered from per-sequence log-probs give the reference mean DPO loss."""
  rng = np.random.default_rng(6)
  rewards = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]], np.float32)
  seq_logp = rng.normal(-20.0, 5.0, 12)
  ref_logp = seq_logp + rng.normal(0.0, 2.0, 12)

  @jax.jit
  def mean_loss(rewards, seq_logp, ref_logp):
    pairs = losses.group_pairs(rewards)
    c, r = pairs.chosen.reshape(-1), pairs.rejected.reshape(-1)
    valid = pairs.valid.reshape(-1)
    per_pair = losses.dpo_loss(seq_logp[c], seq_logp[r], ref_logp[c], ref_logp[r])
    return jnp.sum(jnp.where(valid, per_pair, 0.0)) / jnp.maximum(jnp.sum(valid), 1)

  got = float(mean_loss(jnp.asarray(rewards), jnp.asarray(seq_logp, jnp.float32),
                        jnp.asarray(ref_logp, jnp.float32)))
  s, ref = np.float32(seq_logp).astype(np.float64), np.float32(ref_logp).astype(np.float64)
  terms = [
      -np_log_sigmoid(0.1 * ((s[a] - ref[a]) - (s[b] - ref[b])))
      for pairs in reference_pairs(rewards) for a, b in pairs
  ]
  assert len(terms) == 4 + 3
  np.testing.assert_allclose(got, np.mean(terms), rtol=1e-5)


# ----------------------------------------------------------------------------- token log-probs


@pytest.mark.parametrize("chunk_size,temperature", [(3, 1.0), (16, 0.7)])
def test_chunked_token_logp_matches_full_logits(chunk_size, temperature):
  rng = np.random.default_rng(7)
  n, length, d, v = 3, 7, 5, 11
  hidden = rng.normal(size=(n, length, d))
  head = rng.normal(size=(d, v))
  targets = rng.integers(0, v, (n, length))
  got = jax.jit(
      lambda h, w, t: losses.chunked_token_logp(
          h, w, t, temperature=temperature, chunk_size=chunk_size
      )
  )(jnp.asarray(hidden, jnp.float32), jnp.asarray(head, jnp.float32), jnp.asarray(targets))
  h64, w64 = np.float32(hidden).astype(np.float64), np.float32(head).astype(np.float64)
  logits = h64 @ w64 / temperature
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # Gradient of the sum with respect to the head matches the full-logit computation.
  grad = jax.grad(
      lambda w: losses.chunked_token_logp(
          jnp.asarray(hidden, jnp.float32), w, jnp.asarray(targets),
          temperature=temperature, chunk_size=chunk_size,
      ).sum()
  )(jnp.asarray(head, jnp.float32))
  probs = np.exp(logp)
  onehot = np.eye(v)[targets]
  want_grad = np.einsum("nld,nlv->dv", h64, onehot - probs) / temperature
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-4)
