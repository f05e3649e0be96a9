"""Tests for mopd_jax.losses against an independent float64 numpy reference."""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from mopd_jax import losses

ALPHAS = (0.0, 0.5, 1.0, 0.3, 0.8)
SUPPORTS = ((None, True), (4, True), (4, False))  # (top_k, add_tail)


# ----------------------------------------------------------------------------
# float64 numpy reference
# ----------------------------------------------------------------------------


def np_logsumexp(x, axis=-1):
  m = np.max(x, axis=axis, keepdims=True)
  return (m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)))[..., 0]


def np_log_softmax(x):
  return x - np_logsumexp(x)[..., None]


def np_kl(lp, lq):
  p = np.exp(lp)
  terms = np.where(p > 0, p * (lp - np.where(p > 0, lq, 0.0)), 0.0)
  return terms.sum(-1)


def np_restrict(logits, logp, idx, add_tail):
  """Gathers log-probs at idx and appends log(mass outside idx), or renormalises."""
  top = np.take_along_axis(logp, idx, axis=-1)
  if not add_tail:
    return top - np_logsumexp(top)[..., None]
  if idx.shape[-1] == logits.shape[-1]:
    tail = np.full(top.shape[:-1], -np.inf)  # nothing outside the support
  else:
    outside = np.ones(logits.shape, bool)
    np.put_along_axis(outside, idx, False, axis=-1)
    tail = np_logsumexp(np.where(outside, logp, -np.inf))  # log of the mass outside
  return np.concatenate([top, tail[..., None]], axis=-1)


def np_divergence(student, teacher, alpha, top_k, add_tail):
  """Float64 reference of per_token_divergence written from its definition."""
  student = np.asarray(student, np.float64)
  teacher = np.asarray(teacher, np.float64)
  ls, lt = np_log_softmax(student), np_log_softmax(teacher)
  if top_k is not None:
    k = min(top_k, student.shape[-1])
    idx = np.argsort(-student, axis=-1, kind="stable")[..., :k]
    ls = np_restrict(student, ls, idx, add_tail)
    lt = np_restrict(teacher, lt, idx, add_tail)
  if alpha == 0.0:
    return np_kl(lt, ls)
  if alpha == 1.0:
    return np_kl(ls, lt)
  with np.errstate(divide="ignore"):
    m = np.logaddexp(np.log(1 - alpha) + ls, np.log(alpha) + lt)
  return (1 - alpha) * np_kl(ls, m) + alpha * np_kl(lt, m)


def make_logits(seed, shape=(3, 5, 50)):
  rng = np.random.default_rng(seed)
  student = 3.0 * rng.standard_normal(shape)
  teacher = 0.5 * student + 2.5 * rng.standard_normal(shape)
  return student.astype(np.float32), teacher.astype(np.float32)


STUDENT, TEACHER = make_logits(0)


# ----------------------------------------------------------------------------
# per_token_divergence
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("top_k,add_tail", SUPPORTS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_divergence_matches_reference(alpha, top_k, add_tail):
  got = losses.per_token_divergence(
      jnp.asarray(STUDENT), jnp.asarray(TEACHER), alpha=alpha, top_k=top_k, add_tail=add_tail
  )
  want = np_divergence(STUDENT, TEACHER, alpha, top_k, add_tail)
  assert got.shape == STUDENT.shape[:-1] and got.dtype == jnp.float32
  assert np.all(np.asarray(got) >= -1e-6)
  assert np.median(want) > 1e-2  # the test distributions are far apart
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_divergence_bf16_inputs():
  s16 = jnp.asarray(STUDENT, jnp.bfloat16)
  t16 = jnp.asarray(TEACHER, jnp.bfloat16)
  s_np = np.asarray(s16.astype(jnp.float32))
  t_np = np.asarray(t16.astype(jnp.float32))
  for alpha in (0.0, 0.5, 1.0):
    for top_k, add_tail in SUPPORTS:
      got = losses.per_token_divergence(s16, t16, alpha=alpha, top_k=top_k, add_tail=add_tail)
      assert got.dtype == jnp.float32
      want = np_divergence(s_np, t_np, alpha, top_k, add_tail)
      np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_divergence_identities():
  s, t = jnp.asarray(STUDENT), jnp.asarray(TEACHER)
  for alpha in ALPHAS:
    for top_k, add_tail in SUPPORTS:
      same = losses.per_token_divergence(s, s, alpha=alpha, top_k=top_k, add_tail=add_tail)
      np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-6)
  jsd = lambda a, b: losses.per_token_divergence(a, b, alpha=0.5, top_k=None)
  np.testing.assert_allclose(np.asarray(jsd(s, t)), np.asarray(jsd(t, s)), rtol=1e-5, atol=1e-6)
  forward = losses.per_token_divergence(s, t, alpha=0.0, top_k=None)
  reverse_swapped = losses.per_token_divergence(t, s, alpha=1.0, top_k=None)
  np.testing.assert_allclose(np.asarray(forward), np.asarray(reverse_swapped), rtol=1e-5, atol=1e-6)
  # Reverse KL is the forward KL with arguments swapped, and differs from it here.
  assert not np.allclose(np.asarray(forward), np.asarray(jsd(s, t)))


@pytest.mark.parametrize("alpha", (0.0, 0.5, 1.0))
def test_full_vocab_equals_top_k_vocab_with_tail(alpha):
  s, t = jnp.asarray(STUDENT), jnp.asarray(TEACHER)
  full = losses.per_token_divergence(s, t, alpha=alpha, top_k=None)
  vocab = STUDENT.shape[-1]
  for top_k in (vocab, vocab + 7):
    topk = losses.per_token_divergence(s, t, alpha=alpha, top_k=top_k, add_tail=True)
    np.testing.assert_allclose(np.asarray(topk), np.asarray(full), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_gradients_finite_with_extreme_logits(alpha):
  vocab = 11
  student = np.full((2, 3, vocab), -1e4, np.float32)
  student[..., :3] = [30.0, 5.0, 0.0]  # top-4 mass is ~1 -> tail mass ~0
  teacher = np.full((2, 3, vocab), -1e4, np.float32)
  teacher[0, :, 5:] = 0.0  # teacher puts its mass where the student has none
  teacher[1, :, 0] = 40.0  # near-one-hot agreement
  s, t = jnp.asarray(student), jnp.asarray(teacher)
  for top_k, add_tail in SUPPORTS:

    def f(a, b):
      return jnp.sum(losses.per_token_divergence(a, b, alpha=alpha, top_k=top_k, add_tail=add_tail))

    value = f(s, t)
    grad_s, grad_t = jax.grad(f, argnums=(0, 1))(s, t)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(grad_s))) and np.all(np.isfinite(np.asarray(grad_t)))
    want = np_divergence(student, teacher, alpha, top_k, add_tail).sum()
    np.testing.assert_allclose(float(value), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("alpha", (0.0, 0.5, 1.0))
def test_empty_tail_has_finite_gradients(alpha):
  """Every logit outside the top-3 is -inf: the tail is empty and adds nothing."""
  student = jnp.array([[3.0, 1.0, 0.5, -jnp.inf, -jnp.inf]])
  teacher = jnp.array([[1.0, 2.0, 0.0, -jnp.inf, -jnp.inf]])

  def value_and_grad(s, t, top_k):
    f = lambda s: jnp.sum(losses.per_token_divergence(s, t, alpha=alpha, top_k=top_k))
    return jax.value_and_grad(f)(s)

  value, grad = value_and_grad(student, teacher, 3)
  # The same distributions without the impossible tokens.
  want_value, want_grad = value_and_grad(student[:, :3], teacher[:, :3], None)
  np.testing.assert_allclose(float(value), float(want_value), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad[:, :3]), np.asarray(want_grad), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(grad[:, 3:]), 0.0)
  assert float(value) > 0.1


def confident_logits(seed=4, rows=6, vocab=1000, top_k=100):
  """A peaked student (tail mass ~1e-8 outside its top-k) and a broad teacher."""
  rng = np.random.default_rng(seed)
  student = rng.uniform(-25.0, -20.0, (rows, vocab))
  student[:, :top_k] = rng.uniform(-3.0, 0.0, (rows, top_k))
  student = np.take_along_axis(student, rng.permuted(np.tile(np.arange(vocab), (rows, 1)),
                                                     axis=1), axis=1)
  teacher = rng.standard_normal((rows, vocab))
  return student.astype(np.float32), teacher.astype(np.float32)


def f32_cancelling_forward_kl(student, teacher, top_k):
  """Forward KL with the tail as log(1 - sum_k p_k), clamped, all in float32."""
  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True), dtype=np.float32)

  idx = np.argsort(-student, axis=-1, kind="stable")[..., :top_k]
  buckets = []
  for logp in (log_softmax(student), log_softmax(teacher)):
    top = np.take_along_axis(logp, idx, axis=-1)
    mass = np.minimum(np.log(np.exp(top).sum(-1), dtype=np.float32), np.float32(-1e-7))
    buckets.append(np.concatenate([top, np.log(-np.expm1(mass))[..., None]], axis=-1))
  ls, lt = buckets
  return (np.exp(lt) * (lt - ls)).sum(-1)


@pytest.mark.parametrize("alpha", (0.0, 0.5, 1.0))
def test_tail_without_cancellation_for_a_confident_student(alpha):
  top_k = 100
  student, teacher = confident_logits(top_k=top_k)
  want = np_divergence(student, teacher, alpha, top_k, True)
  got = losses.per_token_divergence(
      jnp.asarray(student), jnp.asarray(teacher), alpha=alpha, top_k=top_k, add_tail=True
  )
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  tail_mass = np.exp(np_restrict(student, np_log_softmax(student.astype(np.float64)),
                                 np.argsort(-student, axis=-1)[..., :top_k], True)[..., -1])
  assert np.all(tail_mass < 1e-7)  # the regime where 1 - sum_k p_k cancels in float32
  if alpha == 0.0:
    cancelling = f32_cancelling_forward_kl(student, teacher, top_k)
    assert np.min(np.abs(cancelling / want - 1.0)) > 0.05


@pytest.mark.parametrize(
    "kwargs,bad",
    [
        (dict(alpha=1.5, top_k=None), "1.5"),
        (dict(alpha=-0.25, top_k=None), "-0.25"),
        (dict(alpha=0.5, top_k=0), "0"),
        (dict(alpha=0.5, top_k=-3), "-3"),
    ],
)
def test_divergence_bad_arguments(kwargs, bad):
  x = jnp.zeros((2, 5))
  with pytest.raises(ValueError, match=bad):
    losses.per_token_divergence(x, x, **kwargs)


# ----------------------------------------------------------------------------
# aggregate
# ----------------------------------------------------------------------------


def np_aggregate(values, mask, mode):
  values = np.asarray(values, np.float64)
  mask = np.asarray(mask, np.float64)
  masked = np.where(mask > 0, values, 0.0) * mask
  if mode == "token-mean":
    return masked.sum() / max(mask.sum(), 1.0)
  if mode == "seq-mean-token-mean-all":
    return float(np.mean([row.sum() / max(row_mask.sum(), 1.0)
                          for row, row_mask in zip(masked, mask)]))
  per_seq = []
  for row, row_mask in zip(masked, mask):
    if row_mask.sum() == 0:
      continue
    per_seq.append(row.sum() if mode == "seq-mean-token-sum" else row.sum() / row_mask.sum())
  return float(np.mean(per_seq)) if per_seq else 0.0


@pytest.mark.parametrize("mode", losses.AGGREGATION_MODES)
def test_aggregate_matches_reference(mode):
  rng = np.random.default_rng(1)
  values = rng.standard_normal((4, 6)).astype(np.float32)
  mask = (rng.random((4, 6)) < 0.6).astype(np.float32)
  mask[0] = 1.0
  mask[2] = 0.0  # fully masked row
  values[2, 1] = np.inf  # masked garbage must not leak
  got = losses.aggregate(jnp.asarray(values), jnp.asarray(mask), mode)
  np.testing.assert_allclose(float(got), np_aggregate(values, mask, mode), rtol=1e-6)
  bool_mask = losses.aggregate(jnp.asarray(values), jnp.asarray(mask > 0), mode)
  np.testing.assert_allclose(float(bool_mask), float(got), rtol=1e-6)
  empty = losses.aggregate(jnp.asarray(values), jnp.zeros((4, 6)), mode)
  assert float(empty) == 0.0


def test_seq_mean_token_mean_all_by_hand():
  # Row means 2, 5 and (no tokens) 0, over all three rows; the other seq-mean
  # modes drop the empty row.
  values = jnp.asarray([[1.0, 3.0, 9.0], [5.0, 7.0, 7.0], [4.0, 4.0, 4.0]])
  mask = jnp.asarray([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
  assert float(losses.aggregate(values, mask, "seq-mean-token-mean-all")) == pytest.approx(7 / 3)
  assert float(losses.aggregate(values, mask, "seq-mean-token-mean")) == pytest.approx(7 / 2)
  weights = losses.aggregation_weights(mask, "seq-mean-token-mean-all")
  np.testing.assert_allclose(weights, [[1 / 6, 1 / 6, 0], [1 / 3, 0, 0], [0, 0, 0]], rtol=1e-6)


def test_aggregate_bad_mode():
  with pytest.raises(ValueError, match="token-avg") as err:
    losses.aggregate(jnp.zeros((2, 3)), jnp.ones((2, 3)), "token-avg")
  for mode in losses.AGGREGATION_MODES:
    assert mode in str(err.value)


# ----------------------------------------------------------------------------
# importance weights
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [losses.importance_clip_weights, losses.rollout_correction_weights])
def test_importance_weights(fn):
  logp = np.array([[-1.0, -2.0, -0.5], [-3.0, 50.0, -40.0]], np.float32)
  old = np.array([[-1.2, -1.0, -2.0], [-3.0, -50.0, 0.0]], np.float32)
  for clip in (2.0, 1e12):
    got = np.asarray(fn(jnp.asarray(logp), jnp.asarray(old), clip))
    want = np.minimum(np.exp(np.clip(logp.astype(np.float64) - old, -20.0, 20.0)), clip)
    np.testing.assert_allclose(got, want, rtol=1e-6)
  assert np.asarray(fn(jnp.asarray(logp), jnp.asarray(old), 2.0)).max() == 2.0
  logp_j, old_j = jnp.asarray(logp), jnp.asarray(old)
  grads = jax.grad(lambda a, b: jnp.sum(fn(a, b, 2.0) * a), argnums=(0, 1))(logp_j, old_j)
  # Only the explicit "* a" factor contributes: the weights carry no gradient.
  np.testing.assert_array_equal(np.asarray(grads[0]), np.asarray(fn(logp_j, old_j, 2.0)))
  np.testing.assert_array_equal(np.asarray(grads[1]), 0.0)


def test_rollout_correction_default_clip_and_bad_clip():
  got = losses.rollout_correction_weights(jnp.array([0.0, 5.0]), jnp.array([0.0, 0.0]))
  np.testing.assert_allclose(np.asarray(got), [1.0, 2.0])
  with pytest.raises(ValueError, match="-1.0"):
    losses.importance_clip_weights(jnp.zeros(2), jnp.zeros(2), -1.0)


# ----------------------------------------------------------------------------
# chunked_distillation
# ----------------------------------------------------------------------------


N, L, D, D_T, V = 3, 7, 8, 6, 37  # V is the only dimension of size 37
TEMPERATURE = 0.7
CHUNK = 3  # does not divide L: the last chunk is padded
MASK = np.array(
    [[1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]], np.float32
)
TOKEN_WEIGHTS = np.asarray(losses.aggregation_weights(jnp.asarray(MASK), "token-mean"))


def chunk_inputs(seed=2):
  rng = np.random.default_rng(seed)
  return dict(
      student_hidden=jnp.asarray(rng.standard_normal((N, L, D)), jnp.float32),
      teacher_hidden=jnp.asarray(rng.standard_normal((N, L, D_T)), jnp.float32),
      student_head=jnp.asarray(rng.standard_normal((D, V)), jnp.float32),
      teacher_head=jnp.asarray(1.5 * rng.standard_normal((D_T, V)), jnp.float32),
      targets=jnp.asarray(rng.integers(0, V, (N, L)), jnp.int32),
  )


def np_target_logp(hidden, head, targets):
  logits = np.asarray(hidden, np.float64) @ np.asarray(head, np.float64) / TEMPERATURE
  logp = np_log_softmax(logits)
  return logits, logp, np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]


def sampler_logp_for(inputs):
  """Sampler log-probs around the student's: some ratios clip at 2, some are below 1."""
  _, _, tok_s = np_target_logp(inputs["student_hidden"], inputs["student_head"],
                               inputs["targets"])
  offsets = np.resize(np.array([-1.0, 0.5, 0.0, -0.3]), tok_s.size).reshape(tok_s.shape)
  return (tok_s + offsets).astype(np.float32)


def np_chunked(inputs, weights, sampler_logp, *, alpha, top_k, add_tail, full_logit, clip=2.0):
  """Float64 reference: (loss, per_token, student_logp, teacher_logp)."""
  s_logits, _, tok_s = np_target_logp(inputs["student_hidden"], inputs["student_head"],
                                      inputs["targets"])
  t_logits, _, tok_t = np_target_logp(inputs["teacher_hidden"], inputs["teacher_head"],
                                      inputs["targets"])
  if full_logit:
    per_token = np_divergence(s_logits, t_logits, alpha, top_k, add_tail)
  else:
    per_token = (tok_s - tok_t) * tok_s
  correction = np.ones_like(tok_s)
  if sampler_logp is not None:
    correction = np.minimum(np.exp(np.clip(tok_s - sampler_logp, -20.0, 20.0)), clip)
  weights = np.asarray(weights, np.float64)
  loss = np.sum(np.where(weights != 0, per_token * correction * weights, 0.0))
  return loss, per_token, tok_s, tok_t


def plain_loss(sh, shead, th, thead, targets, weights, sampler_logp, *, alpha, top_k,
               add_tail, full_logit, clip=2.0):
  """The loss through explicit [N, L, V] logits and plain autodiff: the gradient oracle."""
  s_logits = jnp.einsum("nld,dv->nlv", sh, shead) / TEMPERATURE
  t_logits = jax.lax.stop_gradient(jnp.einsum("nld,dv->nlv", th, thead) / TEMPERATURE)
  tgt = targets[..., None]
  tok_s = jnp.take_along_axis(jax.nn.log_softmax(s_logits), tgt, -1)[..., 0]
  tok_t = jnp.take_along_axis(jax.nn.log_softmax(t_logits), tgt, -1)[..., 0]
  if full_logit:
    per_token = losses.per_token_divergence(
        s_logits, t_logits, alpha=alpha, top_k=top_k, add_tail=add_tail
    )
  else:
    per_token = jax.lax.stop_gradient(tok_s - tok_t) * tok_s
  if sampler_logp is not None:
    per_token = per_token * losses.rollout_correction_weights(tok_s, sampler_logp, clip)
  return jnp.sum(jnp.where(weights != 0, per_token * weights, 0.0))


def custom_loss(sh, shead, th, thead, targets, weights, sampler_logp, *, chunk_size=CHUNK,
                **kwargs):
  return losses.chunked_distillation(
      sh, th, shead, thead, targets, token_weights=weights, sampler_logp=sampler_logp,
      temperature=TEMPERATURE, chunk_size=chunk_size, **kwargs
  )


def outer(loss):
  """A non-linear use of the loss, so the incoming cotangent is not 1."""
  return 3.0 * loss + loss**2


CASES = [
    dict(alpha=alpha, top_k=top_k, add_tail=add_tail, full_logit=True)
    for alpha in (0.0, 0.5, 1.0)
    for top_k, add_tail in ((3, True), (3, False), (None, True))
] + [dict(alpha=1.0, top_k=None, add_tail=True, full_logit=False)]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda kw: "-".join(map(str, kw.values())))
def test_chunked_custom_vjp_matches_plain_gradient(kwargs):
  inputs = chunk_inputs()
  sampler_logp = sampler_logp_for(inputs)
  args = (inputs["student_hidden"], inputs["student_head"], inputs["teacher_hidden"],
          inputs["teacher_head"], inputs["targets"], jnp.asarray(TOKEN_WEIGHTS),
          jnp.asarray(sampler_logp))

  def objective(*a):
    out = custom_loss(*a, **kwargs)
    return outer(out.loss), out

  # The primal path (no gradient) and the path that computes the gradient.
  out_primal = custom_loss(*args, **kwargs)
  (_, out_fwd), got = jax.value_and_grad(objective, argnums=(0, 1, 2, 3), has_aux=True)(*args)
  want_loss, want_per_token, want_s, want_t = np_chunked(
      inputs, TOKEN_WEIGHTS, sampler_logp, **kwargs)
  assert want_loss > 1e-2
  for out in (out_primal, out_fwd):
    assert out.loss.shape == () and out.per_token.shape == (N, L)
    np.testing.assert_allclose(float(out.loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.per_token), want_per_token, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.student_logp), want_s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.teacher_logp), want_t, rtol=1e-5, atol=1e-6)

  want = jax.grad(lambda *a: outer(plain_loss(*a, **kwargs)), argnums=(0, 1))(*args)
  for g, w in zip(got[:2], want):
    # Two float32 paths that sum in different orders: absolute errors scale with the
    # largest gradient entry (up to ~16 here) where it exceeds 1, not with each entry.
    scale = np.abs(np.asarray(w)).max()
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4,
                               atol=1e-6 * max(1.0, scale))
    assert scale > 1e-3
  np.testing.assert_array_equal(np.asarray(got[0])[MASK == 0], 0.0)  # weight 0: no gradient
  np.testing.assert_array_equal(np.asarray(got[2]), 0.0)  # teacher under stop_gradient
  np.testing.assert_array_equal(np.asarray(got[3]), 0.0)


def test_chunked_sampled_token_gradient_matches_numpy():
  """d loss / d (hidden, head) of the sampled-token estimator, written out in float64."""
  inputs = chunk_inputs(3)
  sampler_logp = sampler_logp_for(inputs)
  kwargs = dict(alpha=1.0, top_k=None, add_tail=True, full_logit=False)
  args = (inputs["student_hidden"], inputs["student_head"], inputs["teacher_hidden"],
          inputs["teacher_head"], inputs["targets"], jnp.asarray(TOKEN_WEIGHTS),
          jnp.asarray(sampler_logp))
  got = jax.grad(lambda *a: custom_loss(*a, **kwargs).loss, argnums=(0, 1))(*args)

  _, logp_s, tok_s = np_target_logp(inputs["student_hidden"], inputs["student_head"],
                                    inputs["targets"])
  _, _, tok_t = np_target_logp(inputs["teacher_hidden"], inputs["teacher_head"],
                               inputs["targets"])
  correction = np.minimum(np.exp(tok_s - sampler_logp), 2.0)
  scale = TOKEN_WEIGHTS * correction * (tok_s - tok_t) / TEMPERATURE  # [N, L]
  one_hot = np.eye(V)[np.asarray(inputs["targets"])]
  d_logits = scale[..., None] * (one_hot - np.exp(logp_s))  # [N, L, V]
  hidden = np.asarray(inputs["student_hidden"], np.float64)
  head = np.asarray(inputs["student_head"], np.float64)
  np.testing.assert_allclose(np.asarray(got[0]), d_logits @ head.T, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got[1]), np.einsum("nld,nlv->dv", hidden, d_logits),
                             rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", losses.AGGREGATION_MODES)
def test_chunked_loss_with_aggregation_weights_matches_reference(mode):
  inputs = chunk_inputs(5)
  sampler_logp = sampler_logp_for(inputs)
  kwargs = dict(alpha=0.5, top_k=4, add_tail=True, full_logit=True)
  weights = losses.aggregation_weights(jnp.asarray(MASK), mode)
  out = custom_loss(inputs["student_hidden"], inputs["student_head"], inputs["teacher_hidden"],
                    inputs["teacher_head"], inputs["targets"], weights,
                    jnp.asarray(sampler_logp), **kwargs)
  _, per_token, tok_s, _ = np_chunked(inputs, MASK, sampler_logp, **kwargs)
  correction = np.minimum(np.exp(tok_s - sampler_logp), 2.0)
  np.testing.assert_allclose(float(out.loss), np_aggregate(per_token * correction, MASK, mode),
                             rtol=1e-5)


def test_chunked_without_correction_and_uniform_weights():
  inputs = chunk_inputs(6)
  kwargs = dict(alpha=0.0, top_k=None, add_tail=True, full_logit=True)
  out = losses.chunked_distillation(**inputs, token_weights=jnp.ones((N, L)), chunk_size=4,
                                    temperature=TEMPERATURE, **kwargs)
  want, _, _, _ = np_chunked(inputs, np.ones((N, L)), None, **kwargs)
  np.testing.assert_allclose(float(out.loss), want, rtol=1e-5)


def vocab_matmuls(jaxpr):
  """dot_general equations with a vocabulary-sized operand, in every nested jaxpr."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general" and any(V in v.aval.shape for v in eqn.invars):
      found.append(eqn)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += vocab_matmuls(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += vocab_matmuls(sub)
  return found


@pytest.mark.parametrize("compute_dtype", (jnp.float32, jnp.bfloat16))
def test_chunked_vocabulary_matmul_count_and_dtype(compute_dtype):
  """Forward: 2 vocabulary matmuls; forward + backward: 4, in the compute dtype."""
  inputs = chunk_inputs()
  sh = inputs["student_hidden"].astype(compute_dtype)
  th = inputs["teacher_hidden"].astype(compute_dtype)
  rest = (inputs["teacher_head"], inputs["targets"], jnp.asarray(TOKEN_WEIGHTS), None)
  kwargs = dict(alpha=0.5, top_k=4, add_tail=True, full_logit=True)

  def loss(sh, shead):
    return custom_loss(sh, shead, th, *rest, **kwargs).loss

  forward = vocab_matmuls(jax.make_jaxpr(loss)(sh, inputs["student_head"]).jaxpr)
  both = vocab_matmuls(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(
      sh, inputs["student_head"]).jaxpr)
  assert len(both) == 4
  assert len(forward) == 2
  for eqn in forward + both:
    assert all(v.aval.dtype == compute_dtype for v in eqn.invars)
    assert eqn.outvars[0].aval.dtype == jnp.float32


def test_chunked_bf16_compute_close_to_float32():
  inputs = chunk_inputs()
  sampler_logp = jnp.asarray(sampler_logp_for(inputs))
  kwargs = dict(alpha=0.5, top_k=4, add_tail=True, full_logit=True)
  rest = (inputs["targets"], jnp.asarray(TOKEN_WEIGHTS), sampler_logp)

  def run(dtype):
    sh = inputs["student_hidden"].astype(dtype)
    th = inputs["teacher_hidden"].astype(dtype)
    fn = lambda sh, shead: custom_loss(sh, shead, th, inputs["teacher_head"], *rest,
                                       **kwargs).loss
    return jax.value_and_grad(fn, argnums=(0, 1))(sh, inputs["student_head"])

  (loss16, (d_hidden16, d_head16)), (loss32, (d_hidden32, d_head32)) = (
      run(jnp.bfloat16), run(jnp.float32))
  assert d_hidden16.dtype == jnp.bfloat16 and d_head16.dtype == jnp.float32
  np.testing.assert_allclose(float(loss16), float(loss32), rtol=3e-2)
  for g16, g32 in ((d_hidden16, d_hidden32), (d_head16, d_head32)):
    g16, g32 = np.asarray(g16, np.float32), np.asarray(g32)
    assert np.linalg.norm(g16 - g32) < 5e-2 * np.linalg.norm(g32)


def test_chunked_bad_arguments():
  inputs = chunk_inputs()
  weights = jnp.ones((N, L))
  with pytest.raises(ValueError, match=rf"{V}.*{V + 3}"):
    losses.chunked_distillation(**{**inputs, "teacher_head": jnp.zeros((D_T, V + 3))},
                                token_weights=weights, alpha=1.0, top_k=None)
  with pytest.raises(ValueError, match=r"token_weights.*\(3, 5\)"):
    losses.chunked_distillation(**inputs, token_weights=jnp.ones((3, 5)), alpha=1.0,
                                top_k=None)
  with pytest.raises(ValueError, match=r"sampler_logp.*\(3,\)"):
    losses.chunked_distillation(**inputs, token_weights=weights, alpha=1.0, top_k=None,
                                sampler_logp=jnp.zeros(3))
  with pytest.raises(ValueError, match="correction_clip.*-1.0"):
    losses.chunked_distillation(**inputs, token_weights=weights, alpha=1.0, top_k=None,
                                correction_clip=-1.0)
  with pytest.raises(ValueError, match="0.5"):
    losses.chunked_distillation(**inputs, token_weights=weights, alpha=0.5, top_k=None,
                                full_logit=False)
  with pytest.raises(ValueError, match="1.5"):
    losses.chunked_distillation(**inputs, token_weights=weights, alpha=1.5, top_k=None)
  with pytest.raises(ValueError, match="chunk_size.*0"):
    losses.chunked_distillation(**inputs, token_weights=weights, alpha=1.0, top_k=None,
                                chunk_size=0)


def test_distillation_config_is_normalised_hashable_and_checked_once():
  """Equal settings give one static config; bad ones fail when it is built."""
  a = losses.DistillationConfig(alpha=1, top_k=4, temperature=2, teacher_weights=[1, 0.5])
  b = losses.DistillationConfig(alpha=1.0, top_k=4, temperature=2.0, sampler_temperature=2.0,
                                teacher_weights=(1.0, 0.5))
  assert a == b and hash(a) == hash(b)
  assert a.sampler_temperature == 2.0 and a.teacher_weights == (1.0, 0.5)
  with pytest.raises(ValueError, match="sampler_temperature.*-2.0"):
    losses.DistillationConfig(alpha=1.0, top_k=None, sampler_temperature=-2.0)
  with pytest.raises(ValueError, match="teacher_weights.*'x'"):
    losses.DistillationConfig(alpha=1.0, top_k=None, teacher_weights=(1.0, "x"))
  with pytest.raises(ValueError, match="top_k.*0"):
    losses.DistillationConfig(alpha=1.0, top_k=0)


def test_chunked_gradient_memory():
  n, length, d, vocab = 4, 256, 16, 4096

  def loss_fn(sh, shead, th, thead, targets):
    return losses.chunked_distillation(
        sh, th, shead, thead, targets, token_weights=jnp.ones((n, length)), alpha=0.5,
        top_k=None, chunk_size=32
    ).loss

  f32 = jnp.float32
  specs = (
      jax.ShapeDtypeStruct((n, length, d), f32),
      jax.ShapeDtypeStruct((d, vocab), f32),
      jax.ShapeDtypeStruct((n, length, d), f32),
      jax.ShapeDtypeStruct((d, vocab), f32),
      jax.ShapeDtypeStruct((n, length), jnp.int32),
  )
  compiled = jax.jit(jax.grad(loss_fn, argnums=(0, 1))).lower(*specs).compile()
  stats = compiled.memory_analysis()
  if stats is None:
    pytest.skip("memory_analysis() is unavailable on this platform")
  assert stats.temp_size_in_bytes < n * length * vocab * 4


def test_rollout_correction_at_the_sampling_temperature():
  """With a distillation temperature other than the sampler's, the correction compares
  the sampler's log-probs with the student's at the sampling temperature."""
  inputs = chunk_inputs(7)
  sampler_t = 1.3
  logits = (np.asarray(inputs["student_hidden"], np.float64)
            @ np.asarray(inputs["student_head"], np.float64))
  tok_at_sampler_t = np.take_along_axis(np_log_softmax(logits / sampler_t),
                                        np.asarray(inputs["targets"])[..., None], -1)[..., 0]
  offsets = np.resize(np.array([-1.0, 0.5, 0.0, -0.3]), tok_at_sampler_t.size)
  sampler_logp = (tok_at_sampler_t + offsets.reshape(tok_at_sampler_t.shape))
  kwargs = dict(alpha=0.5, top_k=4, add_tail=True, full_logit=True)
  out = custom_loss(inputs["student_hidden"], inputs["student_head"], inputs["teacher_hidden"],
                    inputs["teacher_head"], inputs["targets"], jnp.asarray(TOKEN_WEIGHTS),
                    jnp.asarray(sampler_logp, jnp.float32), sampler_temperature=sampler_t,
                    **kwargs)
  _, per_token, _, _ = np_chunked(inputs, TOKEN_WEIGHTS, None, **kwargs)
  correction = np.minimum(np.exp(tok_at_sampler_t - sampler_logp), 2.0)
  want = np.sum(np.where(TOKEN_WEIGHTS != 0, per_token * correction * TOKEN_WEIGHTS, 0.0))
  np.testing.assert_allclose(float(out.loss), want, rtol=1e-5)
  assert TEMPERATURE != sampler_t
