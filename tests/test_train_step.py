"""The jitted MOPD step: composition, reference loss, EMA, NaN handling, verifier failures."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mopd_jax import losses, peer_context, settings, train, train_step
from mopd_jax.models import transformer
from mopd_jax.verifiers.result import Result
from tests.conftest import tiny_config


def _hash_scorer(texts, refs):
  """Deterministic mixed rewards (about half succeed) without running code."""
  del refs
  return [Result(reward=float(sum(map(ord, t)) % 2), status="ok") for t in texts]


@pytest.fixture(scope="module")
def setup(tiny_base_dir):
  config = tiny_config(tiny_base_dir)
  return config, train.setup(config, score_batch=_hash_scorer)


@pytest.fixture(scope="module")
def split_step(setup):
  config, s = setup
  return train_step.make_split_step(s.step_cfg, s.mesh, s.host_verifier, s.optimizer,
                                    s.pieces, s.shardings)


def _tree_allclose(a, b, **kw):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


def test_fused_step_traces_once_and_matches_split_pipeline(setup, split_step):
  config, s = setup
  step = s.train_step()
  state = s.init_state()
  split_state = s.init_state()
  for i in range(3):  # the step raises if it is traced a second time
    batch = s.put_batch(s.train_batches.batch(i))
    before = jax.device_get(state.params)
    state, m = step(state, batch)
    split_state, sm = split_step(split_state, batch)
    m, sm = jax.device_get((m, sm))
    for key in m:
      np.testing.assert_allclose(m[key], sm[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert np.isfinite(m["train/loss"]) and m["train/skipped_nonfinite"] == 0
    assert 0.0 < m["train/reward_mean"] < 1.0
    changed = [not np.allclose(x, y) for x, y in
               zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params)))]
    assert any(changed) == (i > 0)  # linear warm-up: the learning rate of step 0 is 0
  assert int(state.step) == 3
  _tree_allclose(state.params, split_state.params, rtol=1e-4, atol=1e-6)


def test_ema_teacher_update_formula(setup, split_step):
  config, s = setup
  state = s.init_state()
  # Make teacher and student differ first, so the mix is visible.
  state = state.replace(teacher_params=jax.tree.map(lambda t: t * 0.5, state.teacher_params))
  old_t, old_s = jax.device_get((state.teacher_params, state.params))
  new_state, m = split_step(state, s.put_batch(s.train_batches.batch(0)))
  rate = config.teacher.ema_rate
  # The student after this step's update (at step 0 of the warm-up equal to old_s).
  new_s = jax.device_get(new_state.params)
  expected = jax.tree.map(lambda t, p: (1 - rate) * t + rate * p, old_t, new_s)
  _tree_allclose(new_state.teacher_params, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("finite", [True, False])
def test_ema_mixes_in_the_post_update_student(setup, finite):
  """MOPD spec §4: theta_T <- (1 - rate) theta_T + rate theta_S with theta_S after this
  step's optimizer update, only when the step is finite; float64 numpy reference."""
  _, s = setup
  rate = 0.3
  cfg = dataclasses.replace(s.step_cfg, teacher=settings.TeacherSettings(mode="ema",
                                                                         ema_rate=rate))
  rng = np.random.default_rng(0)
  params = {"a": rng.normal(size=(3, 2)).astype(np.float32),
            "b": rng.normal(size=(4,)).astype(np.float32)}
  teacher_params = jax.tree.map(lambda p: p + 1.0, params)
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  optimizer = optax.sgd(0.5)  # new student = student - 0.5 * grads
  state = train_step.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=optimizer.init(params), teacher_params=teacher_params,
                                rng=jax.random.PRNGKey(0))
  loss = jnp.float32(1.0 if finite else np.nan)
  new_state, _, ok = jax.jit(train_step.apply_update, static_argnums=(0, 1))(
      cfg, optimizer, state, loss, grads)
  assert bool(ok) == finite
  for name in params:
    s64, t64, g64 = (np.asarray(x[name], np.float64) for x in (params, teacher_params, grads))
    student = s64 - 0.5 * g64 if finite else s64
    teacher = (1 - rate) * t64 + rate * student if finite else t64
    np.testing.assert_allclose(new_state.params[name], student, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(new_state.teacher_params[name], teacher, rtol=1e-6, atol=1e-6)


def test_nonfinite_loss_skips_update_and_is_reported(setup, split_step):
  config, s = setup
  state = s.init_state()
  state = state.replace(teacher_params=jax.tree.map(lambda t: t * jnp.nan,
                                                    state.teacher_params))
  before = jax.device_get(state)
  new_state, m = split_step(state, s.put_batch(s.train_batches.batch(0)))
  assert m["train/skipped_nonfinite"] == 1.0
  assert not np.isfinite(float(m["train/loss"]))
  _tree_allclose(new_state.params, before.params, rtol=0, atol=0)
  _tree_allclose(new_state.opt_state, before.opt_state, rtol=0, atol=0)
  assert int(new_state.step) == 1  # the step counter (and data position) still advances


def test_verifier_exception_scores_zero_and_is_counted(tiny_base_dir):
  config = tiny_config(tiny_base_dir)

  def broken(texts, refs):
    raise RuntimeError("verifier exploded")

  s = train.setup(config, score_batch=broken)
  step = train_step.make_split_step(s.step_cfg, s.mesh, s.host_verifier, s.optimizer,
                                    s.pieces, s.shardings)
  state, m = step(s.init_state(), s.put_batch(s.train_batches.batch(0)))
  n = config.data.batch_size * config.sampling.num_samples
  assert m["train/reward_mean"] == 0.0 and m["verify/errors"] == n
  # All-failure groups still get 1F contexts and a finite update.
  assert np.isfinite(float(m["train/loss"]))


def test_step_loss_equals_unchunked_reference(setup):
  """Recompute the step's loss from full logits with the public per-token divergence."""
  config, s = setup
  cfg = s.step_cfg
  state = s.init_state()
  batch = s.train_batches.batch(1)
  sample_key, peer_key = train_step.step_keys(state)
  # Jitted, as the step runs them: eager calls of the scanned model compile op by op.
  out = jax.device_get(jax.jit(cfg.sampler.__call__)(
      state.params, batch["prompt_tokens"], batch["prompt_mask"], sample_key))
  ids = np.repeat(batch["example_id"], cfg.num_samples)
  rewards, status, fb, fbl = s.host_verifier(ids, out.tokens, out.lengths)
  rollouts = train_step.Rollouts(tokens=out.tokens, logprobs=out.logprobs,
                                 lengths=out.lengths, finished=out.finished,
                                 rewards=rewards, status=status, feedback=fb,
                                 feedback_lengths=fbl)
  update = jax.jit(lambda st, b, r, k: train_step.update(cfg, s.optimizer, s.pieces, st, b,
                                                         r, k))
  _, metrics = update(state, batch, rollouts, peer_key)

  # Reference: explicit teacher prompts, full-sequence logits, unchunked divergence.
  g, n, lr = cfg.num_samples, out.tokens.shape[0], out.tokens.shape[1]
  success = (rewards >= 1.0).reshape(-1, g)
  sel = peer_context.select_peers(jnp.asarray(success), peer_key)
  rows = jax.tree.map(lambda x: x.reshape(n), peer_context.to_row_indices(sel))
  prompt = np.repeat(batch["prompt_tokens"], g, 0)
  pmask = np.repeat(batch["prompt_mask"], g, 0)
  t_tokens, t_mask = peer_context.assemble_teacher_prompts(
      prompt, pmask, np.repeat(batch["insert_index"], g),
      peer_context.PeerBlocks(out.tokens, out.lengths - out.finished, rows), s.pieces,
      peer_cap=cfg.peers.peer_cap, pad_id=0)
  rmask = np.arange(lr)[None] < out.lengths[:, None]

  def response_logits(params, p_tokens, p_mask):
    toks = np.concatenate([np.asarray(p_tokens), out.tokens], 1)
    mask = np.concatenate([np.asarray(p_mask), rmask], 1)
    full = jax.jit(transformer.logits, static_argnums=0)(s.model_cfg, params, toks, mask)
    lp = p_tokens.shape[1]
    return full[:, lp - 1:lp - 1 + lr]

  student = response_logits(state.params, prompt, pmask)
  teacher = response_logits(state.teacher_params, t_tokens, t_mask)
  per_token = losses.per_token_divergence(student, teacher, alpha=cfg.loss.alpha,
                                          top_k=cfg.loss.top_k, add_tail=cfg.loss.add_tail)
  logp = jnp.take_along_axis(jax.nn.log_softmax(student), out.tokens[..., None], -1)[..., 0]
  weights = jnp.minimum(jnp.exp(logp - out.logprobs), cfg.loss.rollout_correction_clip)
  mask = rmask & np.asarray(sel.mask).reshape(n)[:, None]
  # seq-mean-token-mean-all (the distillation default): each row's masked token-mean,
  # averaged over all n rows.
  per_row = (np.asarray(per_token * weights, np.float64) * mask).sum(1)
  expected = float(np.mean(per_row / np.maximum(mask.sum(1), 1)))
  np.testing.assert_allclose(float(metrics["train/loss"]), expected, rtol=1e-4)
  assert expected > 0


def test_feedback_path_reprompts_all_failure_groups(tiny_base_dir):
  """1S + own feedback: with every rollout failing, only feedback makes a context."""
  config = tiny_config(tiny_base_dir, **{
      "peers.include_another": False, "peers.include_failure": False,
      "peers.include_feedback": True, "peers.feedback_len": 12})

  def all_fail(texts, refs):
    return [Result(reward=0.0, feedback="expected 7 got 9", status="ok") for _ in texts]

  s = train.setup(config, score_batch=all_fail)
  step = train_step.make_split_step(s.step_cfg, s.mesh, s.host_verifier, s.optimizer,
                                    s.pieces, s.shardings)
  _, m = step(s.init_state(), s.put_batch(s.train_batches.batch(0)))
  assert m["train/reprompt_fraction"] == 1.0  # feedback counts as a block
  feedback_tokens = min(len(s.tokenizer.encode("expected 7 got 9")), 12)  # capped
  header = len(s.pieces.feedback_header) + len(s.pieces.closing)
  prompt_lengths = s.train_batches.batch(0)["prompt_mask"].sum(1)
  assert m["train/teacher_prompt_len_max"] == prompt_lengths.max() + header + feedback_tokens
  assert np.isfinite(float(m["train/loss"])) and float(m["train/loss"]) > 0

  config_off = tiny_config(tiny_base_dir, **{
      "peers.include_another": False, "peers.include_failure": False})
  s_off = train.setup(config_off, score_batch=all_fail)
  step_off = train_step.make_split_step(s_off.step_cfg, s_off.mesh, s_off.host_verifier,
                                        s_off.optimizer, s_off.pieces, s_off.shardings)
  _, m_off = step_off(s_off.init_state(), s_off.put_batch(
      s_off.train_batches.batch(0)))
  assert m_off["train/reprompt_fraction"] == 0.0 and float(m_off["train/loss"]) == 0.0
