"""Every config.algorithm in the update: the step runs, and its loss equals a float64 reference
recomputed from the step's own inputs with full (unchunked) logits."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopd_jax import (algorithms, peer_controls, peer_template, settings, step_teacher,
                      teacher, train_step)
from mopd_jax.models import transformer

MODEL = transformer.ModelConfig(vocab_size=31, num_layers=1, embed_dim=16, num_heads=2,
                                num_kv_heads=1, head_dim=8, mlp_dim=32, remat_policy="none")
B, G, LP, LR = 2, 4, 5, 6
N = B * G
TEMPERATURE = 0.8  # sampling temperature: policy log-probs are taken at it
# Group 0: graded rewards (pairs, one success); group 1: all fail (no pair, no success).
REWARDS = np.array([1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0], np.float32)
# Template ids 19..28, apart from prompt (15..18) and response (2..14) ids.
PIECES = peer_template.TemplatePieces(*(jnp.asarray([19 + k, 20 + k], jnp.int32)
                                       for k in range(0, 10, 2)))


# SDPO's 1S context, as a user sets it (the peers section's defaults are 2S1F).
ONE_S = dict(include_another=False, include_failure=False)


def make_cfg(name, **knobs):
  return train_step.StepConfig(
      model=MODEL,
      sampling=settings.SamplingSettings(num_samples=G, max_response_len=LR,
                                         temperature=TEMPERATURE),
      peers=settings.PeerSettings(peer_cap=LR, feedback_len=3,
                                  **(ONE_S if name == "sdpo" else {})),
      loss=settings.LossSettings(alpha=knobs.pop("alpha", 0.5), top_k=None, chunk_size=4,
                                 rollout_correction_clip=0.0),
      teacher=settings.TeacherSettings(mode="frozen"),
      optim=settings.OptimSettings(),
      stop_ids=(1,),
      pad_id=0,
      algorithm=settings.AlgorithmSettings(name=name, **knobs),
  )


def make_inputs(seed=0):
  rng = np.random.default_rng(seed)
  prompt_len = np.array([LP, 3])
  prompt_tokens = rng.integers(15, 19, (B, LP)).astype(np.int32)
  prompt_mask = np.arange(LP)[None, :] >= (LP - prompt_len)[:, None]
  prompt_tokens[~prompt_mask] = 0
  batch = {"prompt_tokens": prompt_tokens, "prompt_mask": prompt_mask,
           "insert_index": prompt_len.astype(np.int32), "example_id": np.arange(B, dtype=np.int32)}
  lengths = np.array([6, 2, 4, 5, 3, 6, 1, 4], np.int32)
  tokens = rng.integers(2, 15, (N, LR)).astype(np.int32)
  tokens[np.arange(LR)[None, :] >= lengths[:, None]] = 0
  feedback_lengths = np.array([0, 2, 0, 0, 3, 0, 3, 1], np.int32)
  rollouts = train_step.Rollouts(
      tokens=tokens, logprobs=rng.normal(-2.0, 0.5, (N, LR)).astype(np.float32),
      lengths=lengths, finished=np.zeros(N, bool), rewards=REWARDS,
      status=np.zeros(N, np.int32), feedback=rng.integers(2, 15, (N, 3)).astype(np.int32),
      feedback_lengths=feedback_lengths)
  params = transformer.init_params(MODEL, jax.random.key(seed))
  other = transformer.init_params(MODEL, jax.random.key(seed + 100))
  optimizer, _ = train_step.make_optimizer(settings.OptimSettings())
  state = train_step.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                opt_state=optimizer.init(params),
                                teacher_params=teacher.init_teacher(other),
                                rng=jax.random.PRNGKey(seed))
  return batch, rollouts, state, optimizer


def run_update(cfg, seed=0):
  batch, rollouts, state, optimizer = make_inputs(seed)
  peer_key = jax.random.key(seed + 7)
  update = jax.jit(functools.partial(train_step.update, cfg, optimizer, PIECES))
  new_state, metrics = update(state, batch, rollouts, peer_key)
  inputs = step_teacher.build_teacher_inputs(cfg, PIECES, batch, rollouts, peer_key)
  return state, new_state, jax.device_get(metrics), rollouts, jax.device_get(inputs)


def log_softmax64(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def response_logp64(params, prompt_tokens, prompt_mask, rollouts, temperature):
  """float64 [N, LR, V] log-probs at the response positions, from full float32 logits."""
  tokens = np.concatenate([np.asarray(prompt_tokens), rollouts.tokens], 1)
  rmask = np.arange(LR)[None] < rollouts.lengths[:, None]
  mask = np.concatenate([np.asarray(prompt_mask), rmask], 1)
  logits = transformer.logits(MODEL, params, tokens, mask)
  lp = prompt_tokens.shape[1]
  return log_softmax64(np.asarray(logits[:, lp - 1:lp - 1 + LR], np.float64) / temperature)


def token_logp64(full, rollouts):
  return np.take_along_axis(full, rollouts.tokens[..., None], -1)[..., 0]


def response_mask():
  _, rollouts, _, _ = make_inputs()
  return np.arange(LR)[None] < rollouts.lengths[:, None]


def student_logp64(state, inputs, rollouts):
  full = response_logp64(state.params, inputs.prompt_tokens, inputs.prompt_mask, rollouts,
                         TEMPERATURE)
  return token_logp64(full, rollouts)


def reference_pairs():
  rewards = REWARDS.reshape(B, G)
  return [(b * G + i, b * G + j) for b in range(B) for i, j in itertools.permutations(range(G), 2)
          if rewards[b, i] > rewards[b, j]]


def test_algorithm_names_and_own_feedback_default():
  assert algorithms.names()[:7] == ("mopd", "sdpo", "opd", "grpo", "sft", "dpo", "simpo")
  assert [algorithms.get(n).peer_context for n in ("mopd", "sdpo", "opd", "grpo")] == [
      True, True, False, False]
  # Own feedback (only without a solution) is on by default for every algorithm.
  # The distillation methods aggregate as the authors' runs do (MOPD spec section 3).
  for name, aggregation in (("mopd", "seq-mean-token-mean-all"),
                            ("opd", "seq-mean-token-mean-all"), ("grpo", "token-mean")):
    config = settings.base_config()
    config.algorithm.name = name
    st = settings.from_config(config)
    assert st.peers.include_feedback and st.peers.feedback_only_without_solution
    assert st.loss.aggregation == algorithms.get(name).default_aggregation == aggregation


def test_sdpo_never_overrides_the_peers_section():
  config = settings.base_config()
  config.algorithm.name = "sdpo"
  with pytest.raises(settings.ConfigError,
                     match=r"config\.peers\.include_another = True, config\.peers\."
                           r"include_failure = True with config\.algorithm\.name = 'sdpo'.*"
                           r"set --config\.peers\.include_another=False "
                           r"--config\.peers\.include_failure=False"):
    settings.from_config(config)
  config.peers.include_another = False
  with pytest.raises(settings.ConfigError,
                     match=r"Invalid config\.peers\.include_failure = True with"):
    settings.from_config(config)
  config.peers.include_failure = False
  config.peers.include_feedback = False  # SDPO without feedback, as the authors also run it
  st = settings.from_config(config)
  assert (st.peers.include_primary, st.peers.include_another, st.peers.include_failure,
          st.peers.include_feedback) == (True, False, False, False)


def test_mopd_shows_own_feedback_by_default_only_without_a_solution():
  """Hand-built: group 0 has one success (row 0), so rows 1-3 see it and row 0 has no
  primary but no feedback; group 1 fails throughout, so its rows with feedback (4, 6, 7)
  show it."""
  cfg = make_cfg("mopd")
  assert cfg.peers.include_feedback and cfg.peers.feedback_only_without_solution
  batch, rollouts, _, _ = make_inputs()
  build = jax.jit(functools.partial(step_teacher.build_teacher_inputs, cfg, PIECES))
  inputs = jax.device_get(build(batch, rollouts, jax.random.key(0)))
  header = np.asarray(PIECES.feedback_header)
  shows = [any(np.array_equal(row[i:i + len(header)], header)
               for i in range(len(row) - len(header) + 1)) for row in inputs.teacher_tokens]
  np.testing.assert_array_equal(np.flatnonzero(shows), [4, 6, 7])


def test_unknown_algorithm_names_the_registered_ones():
  config = settings.base_config()
  config.algorithm.name = "ppo"
  with pytest.raises(settings.ConfigError,
                     match=r"config\.algorithm\.name = 'ppo'.*'mopd', 'sdpo'"):
    settings.from_config(config)


def test_grpo_loss_and_gradient_match_reference():
  cfg = make_cfg("grpo")
  state, new_state, metrics, rollouts, inputs = run_update(cfg)
  mask = response_mask()
  rewards = REWARDS.reshape(B, G).astype(np.float64)
  adv = (rewards - rewards.mean(1, keepdims=True)).reshape(N)
  # With one update per batch the ratio is 1: the surrogate is -A per token.
  expected = (-adv[:, None] * mask).sum() / mask.sum()
  np.testing.assert_allclose(metrics["train/loss"], expected, rtol=1e-5)
  assert metrics["train/zero_advantage_groups"] == 1
  assert np.isfinite(metrics["train/grad_norm"]) and metrics["train/grad_norm"] > 0

  # Gradient: that of -sum(A logp) / tokens, from full logits.
  def surrogate(params):
    tokens = jnp.concatenate([inputs.prompt_tokens, rollouts.tokens], 1)
    full_mask = jnp.concatenate([inputs.prompt_mask, jnp.asarray(mask)], 1)
    logits = transformer.logits(MODEL, params, tokens, full_mask)[:, LP - 1:LP - 1 + LR]
    logp = jax.nn.log_softmax(logits / TEMPERATURE)
    logp = jnp.take_along_axis(logp, rollouts.tokens[..., None], -1)[..., 0]
    return jnp.sum(-jnp.asarray(adv, jnp.float32)[:, None] * logp * mask) / mask.sum()

  inputs_dev = step_teacher.build_teacher_inputs(cfg, PIECES, *make_inputs()[:2],
                                                 jax.random.key(7))
  _, grads, _, _ = train_step.loss_and_grads(cfg, state, inputs_dev, rollouts)
  want = jax.grad(surrogate)(state.params)
  for got_leaf, want_leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-4, atol=1e-6)


def test_sft_loss_matches_reference():
  state, _, metrics, rollouts, inputs = run_update(make_cfg("sft"))
  logp = student_logp64(state, inputs, rollouts)
  verified = [n for n in range(N) if REWARDS[n] >= 1.0]
  expected = np.mean([-logp[n, :rollouts.lengths[n]].mean() for n in verified])
  np.testing.assert_allclose(metrics["train/loss"], expected, rtol=1e-5)
  assert metrics["train/verified_fraction"] == pytest.approx(1 / N)
  assert metrics["train/groups_without_verified"] == 1


def test_dpo_loss_matches_reference():
  state, new_state, metrics, rollouts, inputs = run_update(make_cfg("dpo", dpo_beta=0.5))
  mask = response_mask()
  seq = (student_logp64(state, inputs, rollouts) * mask).sum(1)
  ref_full = response_logp64(state.teacher_params, inputs.prompt_tokens, inputs.prompt_mask,
                             rollouts, TEMPERATURE)
  ref = (token_logp64(ref_full, rollouts) * mask).sum(1)
  pairs = reference_pairs()
  margins = [(seq[a] - ref[a]) - (seq[b] - ref[b]) for a, b in pairs]
  expected = np.mean([np.logaddexp(0.0, -0.5 * m) for m in margins])
  np.testing.assert_allclose(metrics["train/loss"], expected, rtol=1e-5)
  assert metrics["train/num_pairs"] == len(pairs) == 5
  assert metrics["train/groups_without_pairs"] == 1
  # The reference model (frozen teacher slot) does not move.
  for a, b in zip(jax.tree.leaves(new_state.teacher_params),
                  jax.tree.leaves(state.teacher_params)):
    np.testing.assert_array_equal(a, b)


def test_simpo_loss_matches_reference():
  knobs = dict(simpo_beta=2.0, simpo_gamma=0.5, simpo_label_smoothing=0.1)
  state, _, metrics, rollouts, inputs = run_update(make_cfg("simpo", **knobs))
  mask = response_mask()
  per_token = (student_logp64(state, inputs, rollouts) * mask).sum(1) / mask.sum(1)
  terms = []
  for a, b in reference_pairs():
    m = 2.0 * (per_token[a] - per_token[b]) - 0.5
    terms.append(0.9 * np.logaddexp(0.0, -m) + 0.1 * np.logaddexp(0.0, m))
  np.testing.assert_allclose(metrics["train/loss"], np.mean(terms), rtol=1e-5)


def np_divergence(ls, lt, alpha):
  def kl(lp, lq):
    return (np.exp(lp) * (lp - lq)).sum(-1)

  if alpha == 1.0:
    return kl(ls, lt)
  lm = np.logaddexp(np.log(1 - alpha) + ls, np.log(alpha) + lt)
  return (1 - alpha) * kl(ls, lm) + alpha * kl(lt, lm)


@pytest.mark.parametrize("name,alpha", [("opd", 1.0), ("sdpo", 0.5)])
def test_distillation_variants_match_reference(name, alpha):
  cfg = make_cfg(name, alpha=alpha)
  state, _, metrics, rollouts, inputs = run_update(cfg)
  student = response_logp64(state.params, inputs.prompt_tokens, inputs.prompt_mask, rollouts,
                            1.0)
  teacher_full = response_logp64(state.teacher_params, inputs.teacher_tokens,
                                 inputs.teacher_mask, rollouts, 1.0)
  mask = response_mask() & inputs.rollout_mask[:, None]
  # seq-mean-token-mean-all (the distillation default): each row's masked token-mean,
  # averaged over all rows.
  per_row = (np_divergence(student, teacher_full, alpha) * mask).sum(1)
  expected = np.mean(per_row / np.maximum(mask.sum(1), 1))
  np.testing.assert_allclose(metrics["train/loss"], expected, rtol=1e-4)
  if name == "opd":
    # No peers: the teacher reads the student's prompt, and every rollout is trained on.
    np.testing.assert_array_equal(inputs.teacher_tokens, inputs.prompt_tokens)
    assert inputs.rollout_mask.all()
  else:
    # 1S and own feedback only: no another / failure headers; group 1 (all fail) is
    # trained on exactly where it has feedback.
    another_or_failure = np.concatenate([PIECES.another_header, PIECES.failure_header])
    assert not np.isin(inputs.teacher_tokens, another_or_failure).any()
    np.testing.assert_array_equal(inputs.rollout_mask[G:], [True, False, True, True])
    np.testing.assert_array_equal(inputs.rollout_mask[:G], [False, True, True, True])


def test_dpo_settings_need_a_frozen_reference_and_whole_batch():
  config = settings.base_config()
  config.algorithm.name = "dpo"
  with pytest.raises(settings.ConfigError, match="teacher.mode = 'ema'.*'dpo'.*frozen"):
    settings.from_config(config)
  config.teacher.mode = "frozen"
  config.optim.micro_batch_rows = 8
  with pytest.raises(settings.ConfigError, match="micro_batch_rows = 8.*'dpo'"):
    settings.from_config(config)


@pytest.mark.parametrize("name", ["grpo", "sft"])
def test_per_token_policy_losses_split_over_micro_batches(name):
  batch, rollouts, state, _ = make_inputs(1)
  results = []
  for rows in (0, 4):
    cfg = dataclasses.replace(make_cfg(name),
                              optim=settings.OptimSettings(micro_batch_rows=rows))

    @jax.jit
    def fn(state, batch, rollouts, cfg=cfg):
      inputs = step_teacher.build_teacher_inputs(cfg, PIECES, batch, rollouts,
                                                 jax.random.key(0))
      return train_step.loss_and_grads(cfg, state, inputs, rollouts)[:2]

    results.append(jax.device_get(fn(state, batch, rollouts)))
  (loss, grads), (mb_loss, mb_grads) = results
  assert loss != 0.0
  np.testing.assert_allclose(mb_loss, loss, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(mb_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("control,budget", [("random_peer", "blocks"),
                                            ("unrelated_prompt", "tokens"),
                                            ("success_only_matched", "tokens")])
def test_peer_controls_feed_the_teacher_prompts(control, budget):
  cfg = make_cfg("mopd")
  # Feedback off: response ids then reach the teacher prompt only through peer blocks.
  cfg = dataclasses.replace(cfg, peers=dataclasses.replace(
      cfg.peers, control=control, control_budget=budget, include_feedback=False))
  batch, rollouts, state, optimizer = make_inputs()
  rewards = np.array([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0], np.float32)
  rollouts = rollouts.replace(rewards=rewards)
  key = jax.random.key(3)
  inputs = jax.device_get(step_teacher.build_teacher_inputs(cfg, PIECES, batch, rollouts, key))
  want = jax.device_get(peer_controls.matched_control(
      jnp.asarray(rewards.reshape(B, G) >= 1.0), jnp.asarray(rollouts.lengths.reshape(B, G)),
      key, control=control, peer_cap=LR, budget=budget))
  # Response ids (2..14) reach the teacher prompt only through peer blocks.
  peer_tokens = ((inputs.teacher_tokens >= 2) & (inputs.teacher_tokens <= 14)).sum(1)
  np.testing.assert_array_equal(peer_tokens, want.block_lengths.sum(-1).reshape(N))
  np.testing.assert_array_equal(inputs.rollout_mask, want.rows.mask.reshape(N))
  if budget == "tokens":
    assert (peer_tokens <= want.budget_tokens.reshape(N)).all()
    assert (peer_tokens > 0).any()
  if control == "success_only_matched":
    # The failure slot holds a success and is labelled as one.
    assert not np.isin(inputs.teacher_tokens, PIECES.failure_header).any()
    another = [np.sum(row == int(PIECES.another_header[0])) for row in inputs.teacher_tokens]
    # Rollout 0's 2S1F budget is successes 1, 2 and failure 3: it sees 1, 2 and then
    # success 4 of the other prompt in the failure slot.
    assert another[0] == 2
    np.testing.assert_array_equal(want.rows.failure[0, 0], 4)
    update = jax.jit(functools.partial(train_step.update, cfg, optimizer, PIECES))
    _, metrics = update(state, batch, rollouts, key)
    assert np.isfinite(float(metrics["train/loss"])) and float(metrics["train/loss"]) > 0


def test_peer_control_needs_the_2s1f_knobs():
  with pytest.raises(settings.ConfigError, match="peers.control = 'random_peer'.*2S1F"):
    settings.PeerSettings(control="random_peer", include_failure=False)
  with pytest.raises(settings.ConfigError, match="control = 'nearest'"):
    settings.PeerSettings(control="nearest")
