"""Teacher and context variants: the trust-region teacher."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopd_jax import losses, settings, step_teacher, teacher, train, train_step
from mopd_jax.models import transformer
from tests.conftest import load_config, sampled_rollouts, tiny_config
from tests.test_losses import D, D_T, L, N, TEMPERATURE, V, np_divergence, np_log_softmax

RATE = 0.3
TOP_K = 4


def _trust_inputs(seed=5):
  """Student hidden/head, reference hidden/head, and the student's hidden states on the
  teacher prompt (its own head)."""
  rng = np.random.default_rng(seed)
  f32 = lambda *shape, scale=1.0: jnp.asarray(scale * rng.standard_normal(shape),  # noqa: E731
                                               jnp.float32)
  return dict(student_hidden=f32(N, L, D), student_head=f32(D, V),
              ref_hidden=f32(N, L, D_T), ref_head=f32(D_T, V, scale=1.5),
              ctx_hidden=f32(N, L, D),
              targets=jnp.asarray(rng.integers(0, V, (N, L)), jnp.int32),
              weights=jnp.asarray(rng.random((N, L)) * (rng.random((N, L)) < 0.8),
                                  jnp.float32))


def _trust_loss(x, rate, **kwargs):
  terms = teacher.trust_region_terms(rate)
  pick = {"reference": (x["ref_hidden"], x["ref_head"]),
          "student": (x["ctx_hidden"], x["student_head"])}
  return losses.chunked_distillation(
      x["student_hidden"], tuple(pick[s][0] for s, _ in terms), x["student_head"],
      tuple(pick[s][1] for s, _ in terms), x["targets"], token_weights=x["weights"],
      teacher_weights=tuple(w for _, w in terms), alpha=0.5, top_k=TOP_K,
      temperature=TEMPERATURE, chunk_size=3, **kwargs)


@pytest.mark.parametrize("rate", [0.0, RATE, 1.0])
def test_trust_region_loss_matches_float64_lerp_of_full_logits(rate):
  x = _trust_inputs()
  out = _trust_loss(x, rate)
  f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
  s_logits = f64(x["student_hidden"]) @ f64(x["student_head"])
  ref_logits = f64(x["ref_hidden"]) @ f64(x["ref_head"])
  ctx_logits = f64(x["ctx_hidden"]) @ f64(x["student_head"])
  t_logits = ((1.0 - rate) * ref_logits + rate * ctx_logits) / TEMPERATURE
  s_logits = s_logits / TEMPERATURE
  per_token = np_divergence(s_logits, t_logits, 0.5, TOP_K, True)
  tgt = np.asarray(x["targets"])[..., None]
  tok_t = np.take_along_axis(np_log_softmax(t_logits), tgt, -1)[..., 0]
  tok_s = np.take_along_axis(np_log_softmax(s_logits), tgt, -1)[..., 0]
  np.testing.assert_allclose(out.per_token, per_token, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(out.teacher_logp, tok_t, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.student_logp, tok_s, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.loss, np.sum(per_token * f64(x["weights"])), rtol=1e-4)


def test_trust_region_gradient_reaches_only_the_students_own_logits():
  x = _trust_inputs()

  def trust(sh, shead, ref_h, ctx_h):
    return _trust_loss({**x, "student_hidden": sh, "student_head": shead, "ref_hidden": ref_h,
                        "ctx_hidden": ctx_h}, RATE).loss

  def oracle(sh, shead, ctx_h):
    # The same teacher as one explicit full-logit term: the head of the student on the
    # teacher prompt is a constant here, so the gradient flows through `sh @ shead` only.
    t_logits = ((1 - RATE) * jnp.einsum("nld,dv->nlv", x["ref_hidden"], x["ref_head"])
                + RATE * jnp.einsum("nld,dv->nlv", ctx_h, jax.lax.stop_gradient(shead)))
    s_logits = jnp.einsum("nld,dv->nlv", sh, shead)
    per_token = losses.per_token_divergence(
        s_logits / TEMPERATURE, jax.lax.stop_gradient(t_logits) / TEMPERATURE, alpha=0.5,
        top_k=TOP_K)
    return jnp.sum(per_token * x["weights"])

  grads = jax.grad(trust, argnums=(0, 1, 2, 3))(x["student_hidden"], x["student_head"],
                                                 x["ref_hidden"], x["ctx_hidden"])
  want = jax.grad(oracle, argnums=(0, 1))(x["student_hidden"], x["student_head"],
                                          x["ctx_hidden"])
  np.testing.assert_allclose(grads[0], want[0], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads[1], want[1], rtol=1e-4, atol=1e-6)
  assert float(jnp.abs(grads[0]).max()) > 1e-4
  assert not np.any(np.asarray(grads[2])) and not np.any(np.asarray(grads[3]))


def test_trust_region_terms_drop_zero_weights():
  assert teacher.trust_region_terms(0.0) == (("reference", 1.0),)
  assert teacher.trust_region_terms(1.0) == (("student", 1.0),)
  assert teacher.trust_region_terms(0.25) == (("reference", 0.75), ("student", 0.25))


def test_teacher_terms_bad_arguments():
  x = _trust_inputs()
  base = dict(targets=x["targets"], token_weights=x["weights"], alpha=0.5, top_k=TOP_K)
  with pytest.raises(ValueError, match="of one count: got 2 hidden, 1 heads and 2"):
    losses.chunked_distillation(x["student_hidden"], (x["ref_hidden"], x["ctx_hidden"]),
                                x["student_head"], (x["ref_head"],),
                                teacher_weights=(0.5, 0.5), **base)
  with pytest.raises(ValueError, match="teacher_weights needs tuples"):
    losses.chunked_distillation(x["student_hidden"], x["ref_hidden"], x["student_head"],
                                x["ref_head"], teacher_weights=(1.0,), **base)
  with pytest.raises(ValueError, match=r"teacher_hidden\[1\] has D=6 but teacher_head\[1\]"):
    losses.chunked_distillation(x["student_hidden"], (x["ref_hidden"], x["ref_hidden"]),
                                x["student_head"], (x["ref_head"], x["student_head"]), **base)


# ----------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------


def test_trust_region_settings():
  s = settings.from_config(load_config(**{"teacher.mode": "trust_region",
                                          "teacher.trust_region_rate": 0.25}))
  assert s.teacher.trust_region == 0.25 and s.teacher.ema == 0.0
  # The rate is read only in mode 'trust_region' (like ema_rate only in mode 'ema').
  s = settings.from_config(load_config(**{"teacher.mode": "ema",
                                          "teacher.trust_region_rate": 0.25}))
  assert s.teacher.trust_region is None
  for bad in (1.5, -0.1):
    with pytest.raises(settings.ConfigError,
                       match=rf"config\.teacher\.trust_region_rate = {bad!r}.*\[0, 1\]"):
      settings.from_config(load_config(**{"teacher.mode": "trust_region",
                                          "teacher.trust_region_rate": bad}))
  with pytest.raises(settings.ConfigError, match="teacher.mode = 'trust_region'.*'dpo'"):
    settings.from_config(load_config(**{"teacher.mode": "trust_region",
                                        "algorithm.name": "dpo"}))


# ----------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trust_setup(tiny_base_dir):
  config = tiny_config(tiny_base_dir, **{"teacher.mode": "trust_region",
                                         "teacher.trust_region_rate": RATE})
  s = train.setup(config)
  state = s.init_state()
  batch = s.train_batches.batch(0)
  rollouts, peer_key = sampled_rollouts(s, state, batch)
  return s, state, batch, rollouts, peer_key


def _with_teacher(cfg, **kw):
  return dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, **kw))


_COMPILED = {}


def _run(cfg, s, state, batch, rollouts, peer_key):
  """Teacher inputs and loss_and_grads, compiled once per step config."""
  if cfg not in _COMPILED:
    def fn(state, batch, rollouts, peer_key):
      inputs = step_teacher.build_teacher_inputs(cfg, s.pieces, batch, rollouts, peer_key)
      return inputs, train_step.loss_and_grads(cfg, state, inputs, rollouts)
    _COMPILED[cfg] = jax.jit(fn)
  return jax.device_get(_COMPILED[cfg](state, batch, rollouts, peer_key))


def test_setup_keeps_the_initial_student_as_reference(trust_setup):
  s, state, *_ = trust_setup
  assert s.step_cfg.teacher.trust_region == RATE and s.step_cfg.teacher_model is None
  for t, p in zip(jax.tree.leaves(state.teacher_params), jax.tree.leaves(state.params)):
    assert t.dtype == jnp.float32
    np.testing.assert_array_equal(t, np.asarray(p, np.float32))


def test_rate_0_is_frozen_and_rate_1_is_the_student_with_context(trust_setup):
  s, state, batch, rollouts, peer_key = trust_setup
  # A reference that differs from the student, so that the rate matters.
  state = state.replace(teacher_params=jax.tree.map(lambda t: t * 0.9, state.teacher_params))
  frozen = _with_teacher(s.step_cfg, mode="frozen")
  _, (loss, grads, s_logp, t_logp) = _run(frozen, s, state, batch, rollouts, peer_key)
  _, (tr_loss, tr_grads, tr_s, tr_t) = _run(
      _with_teacher(s.step_cfg, trust_region_rate=0.0), s, state, batch, rollouts, peer_key)
  assert loss > 0
  np.testing.assert_allclose(tr_loss, loss, rtol=1e-6)
  np.testing.assert_allclose(tr_t, t_logp, rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(tr_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
  # Rate 1 ignores the reference: the frozen teacher holding the student's parameters.
  own = state.replace(teacher_params=teacher.init_teacher(state.params))
  _, (own_loss, _, _, own_t) = _run(frozen, s, own, batch, rollouts, peer_key)
  _, (one_loss, _, _, one_t) = _run(_with_teacher(s.step_cfg, trust_region_rate=1.0), s,
                                    state, batch, rollouts, peer_key)
  np.testing.assert_allclose(one_loss, own_loss, rtol=1e-5)
  np.testing.assert_allclose(one_t, own_t, rtol=1e-5, atol=1e-5)
  assert not np.allclose(one_t, t_logp, atol=1e-3)


def test_step_teacher_logp_is_the_lerp_of_both_models(trust_setup):
  s, state, batch, rollouts, peer_key = trust_setup
  state = state.replace(teacher_params=jax.tree.map(lambda t: t * 0.9, state.teacher_params))
  cfg = s.step_cfg
  inputs, (_, _, _, t_logp) = _run(cfg, s, state, batch, rollouts, peer_key)

  def logits(params):
    hidden = step_teacher.response_hidden(
        cfg.model, params, inputs.teacher_tokens, inputs.teacher_mask, rollouts.tokens,
        inputs.response_mask)
    return np.asarray(hidden, np.float64) @ np.asarray(transformer.lm_head(cfg.model, params),
                                                       np.float64)

  mixed = ((1 - RATE) * logits(state.teacher_params) + RATE * logits(state.params))
  want = np.take_along_axis(np_log_softmax(mixed / cfg.loss.temperature),
                            np.asarray(rollouts.tokens)[..., None], -1)[..., 0]
  mask = np.asarray(inputs.response_mask)
  np.testing.assert_allclose(np.where(mask, t_logp, 0), np.where(mask, want, 0), rtol=1e-4,
                             atol=1e-4)


def test_trust_region_update_moves_the_student_but_never_the_reference(trust_setup):
  s, state, batch, rollouts, peer_key = trust_setup
  # A reference unlike the student, so that an EMA step would move it.
  state = state.replace(teacher_params=jax.tree.map(lambda t: t * 0.9, state.teacher_params))
  update = jax.jit(lambda st, b, r, k: train_step.update(s.step_cfg, s.optimizer, s.pieces,
                                                         st, b, r, k))
  new_state, _ = update(state, batch, rollouts, peer_key)  # learning rate 0 (warm-up)
  new_state, metrics = jax.device_get(update(new_state, batch, rollouts, peer_key))
  assert metrics["train/skipped_nonfinite"] == 0 and metrics["train/loss"] > 0
  moved = [not np.array_equal(a, b) for a, b in
           zip(jax.tree.leaves(new_state.params), jax.tree.leaves(state.params))]
  assert any(moved)
  for a, b in zip(jax.tree.leaves(new_state.teacher_params),
                  jax.tree.leaves(state.teacher_params)):
    np.testing.assert_array_equal(a, b)
