"""Tests for mopd_jax.losses against an independent float64 numpy reference."""

import jax
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


def np_divergence(student, teacher, alpha, top_k, add_tail):
  """Float64 reference of per_token_divergence written from its definition."""
  student = np.asarray(student, np.float64)
  teacher = np.asarray(teacher, np.float64)
  ls, lt = np_log_softmax(student), np_log_softmax(teacher)
  if top_k is not None:
    k = min(top_k, student.shape[-1])
    idx = np.argsort(-student, axis=-1, kind="stable")[..., :k]
    ls = np.take_along_axis(ls, idx, axis=-1)
    lt = np.take_along_axis(lt, idx, axis=-1)
    if add_tail:

      def tail(g):
        mass = np.minimum(np_logsumexp(g), -1e-7)
        return np.concatenate([g, np.log(-np.expm1(mass))[..., None]], axis=-1)

      ls, lt = tail(ls), tail(lt)
    else:
      ls = ls - np_logsumexp(ls)[..., None]
      lt = lt - np_logsumexp(lt)[..., None]
  if alpha == 0.0:
    return np_kl(lt, ls)
  if alpha == 1.0:
    return np_kl(ls, lt)
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

N, L, D, D_T, V = 2, 7, 8, 6, 37
TEMPERATURE = 0.7


def chunk_inputs(seed=2):
  rng = np.random.default_rng(seed)
  return dict(
      student_hidden=jnp.asarray(rng.standard_normal((N, L, D)), jnp.float32),
      teacher_hidden=jnp.asarray(rng.standard_normal((N, L, D_T)), jnp.float32),
      student_head=jnp.asarray(rng.standard_normal((D, V)), jnp.float32),
      teacher_head=jnp.asarray(1.5 * rng.standard_normal((D_T, V)), jnp.float32),
      targets=jnp.asarray(rng.integers(0, V, (N, L)), jnp.int32),
  )


def explicit_logits(hidden, head):
  return jnp.einsum("nld,dv->nlv", hidden, head, preferred_element_type=jnp.float32) / TEMPERATURE


MASK = jnp.asarray(np.array([[1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]], np.float32))


@pytest.mark.parametrize(
    "alpha,top_k,add_tail,chunk_size",
    [(0.5, None, True, 3), (1.0, 4, True, 16), (0.0, 4, False, 3), (0.3, None, True, 7)],
)
def test_chunked_matches_unchunked(alpha, top_k, add_tail, chunk_size):
  inputs = chunk_inputs()
  div_kwargs = dict(alpha=alpha, top_k=top_k, add_tail=add_tail)

  def chunked(sh, shead, th, thead):
    return losses.chunked_distillation(
        sh,
        th,
        shead,
        thead,
        inputs["targets"],
        temperature=TEMPERATURE,
        chunk_size=chunk_size,
        **div_kwargs,
    )

  def unchunked(sh, shead, th, thead):
    s_logits = explicit_logits(sh, shead)
    t_logits = jax.lax.stop_gradient(explicit_logits(th, thead))
    return losses.per_token_divergence(s_logits, t_logits, **div_kwargs)

  args = (
      inputs["student_hidden"],
      inputs["student_head"],
      inputs["teacher_hidden"],
      inputs["teacher_head"],
  )
  loss, student_logp, teacher_logp = chunked(*args)
  assert loss.shape == (N, L) and loss.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(loss), np.asarray(unchunked(*args)), rtol=1e-5, atol=1e-6)

  tgt = inputs["targets"][..., None]
  want_s = jnp.take_along_axis(jax.nn.log_softmax(explicit_logits(*args[:2])), tgt, -1)[..., 0]
  want_t = jnp.take_along_axis(jax.nn.log_softmax(explicit_logits(*args[2:])), tgt, -1)[..., 0]
  np.testing.assert_allclose(np.asarray(student_logp), np.asarray(want_s), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(teacher_logp), np.asarray(want_t), rtol=1e-5, atol=1e-6)

  def chunked_objective(*a):
    loss, student_logp, teacher_logp = chunked(*a)
    return jnp.sum(loss * MASK) + 0.1 * jnp.sum((student_logp + teacher_logp) * MASK)

  def unchunked_objective(sh, shead, th, thead):
    logp = jnp.take_along_axis(jax.nn.log_softmax(explicit_logits(sh, shead)), tgt, -1)[..., 0]
    return jnp.sum(unchunked(sh, shead, th, thead) * MASK) + 0.1 * jnp.sum(logp * MASK)

  got = jax.grad(chunked_objective, argnums=(0, 1, 2, 3))(*args)
  want = jax.grad(unchunked_objective, argnums=(0, 1))(*args)
  for g, w in zip(got[:2], want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(got[0])).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(got[2]), 0.0)
  np.testing.assert_array_equal(np.asarray(got[3]), 0.0)


def test_chunked_sampled_token_mode():
  inputs = chunk_inputs(3)
  sh, shead = inputs["student_hidden"], inputs["student_head"]

  def objective(sh, shead):
    loss, lp_s, lp_t = losses.chunked_distillation(
        sh,
        inputs["teacher_hidden"],
        shead,
        inputs["teacher_head"],
        inputs["targets"],
        alpha=1.0,
        top_k=None,
        temperature=TEMPERATURE,
        chunk_size=3,
        full_logit=False,
    )
    return jnp.sum(loss * MASK), (loss, lp_s, lp_t)

  grad_fn = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
  (_, (loss, lp_s, lp_t)), grads = grad_fn(sh, shead)
  np.testing.assert_allclose(
      np.asarray(loss), np.asarray((lp_s - lp_t) * lp_s), rtol=1e-6, atol=1e-7
  )
  tgt = inputs["targets"][..., None]

  def reference(sh, shead):
    s = jnp.take_along_axis(jax.nn.log_softmax(explicit_logits(sh, shead)), tgt, -1)[..., 0]
    t_logits = explicit_logits(inputs["teacher_hidden"], inputs["teacher_head"])
    t = jnp.take_along_axis(jax.nn.log_softmax(t_logits), tgt, -1)[..., 0]
    return jnp.sum(jax.lax.stop_gradient(s - t) * s * MASK)

  for g, w in zip(grads, jax.grad(reference, argnums=(0, 1))(sh, shead)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


def test_chunked_bad_arguments():
  inputs = chunk_inputs()
  bad_head = jnp.zeros((D_T, V + 3))
  with pytest.raises(ValueError, match=rf"{V}.*{V + 3}"):
    losses.chunked_distillation(
        inputs["student_hidden"],
        inputs["teacher_hidden"],
        inputs["student_head"],
        bad_head,
        inputs["targets"],
        alpha=1.0,
        top_k=None,
    )
  with pytest.raises(ValueError, match="0.5"):
    losses.chunked_distillation(**inputs, alpha=0.5, top_k=None, full_logit=False)
  with pytest.raises(ValueError, match="1.5"):
    losses.chunked_distillation(**inputs, alpha=1.5, top_k=None)
  with pytest.raises(ValueError, match="chunk_size.*0"):
    losses.chunked_distillation(**inputs, alpha=1.0, top_k=None, chunk_size=0)


def test_chunked_gradient_memory():
  n, length, d, vocab = 4, 256, 16, 4096

  def loss_fn(sh, shead, th, thead, targets):
    loss, _, _ = losses.chunked_distillation(
        sh, th, shead, thead, targets, alpha=0.5, top_k=None, chunk_size=32
    )
    return jnp.sum(loss)

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
